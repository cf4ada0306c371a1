"""Policies declared once (tova_engine/state/policies.py) and TOVA's recency protection: the
latest r positions always stay; r = 0 is the paper's TOVA (the slow reference), r = S/2 the default
and r >= S a window; TOVA with r equals a slow
reference decoder that protects the same positions (float64, per-token and whole-prompt
prefill); bad declarations and values are refused naming the parameter."""

from __future__ import annotations

import random

import pytest

from tests.test_correctness import PROMPT, reference_decoder
from tova_engine import LLM, EngineConfig, InvalidRequestError, SamplingParams
from tova_engine.attention.fused import check_kernel_runs
from tova_engine.state.policies import POLICIES, Policy, make_policy


def run(model, prompts, state_size=8, max_tokens=12, chunk=1, engine_recent=None, **params):
    llm = LLM(str(model), state_size=state_size, dtype="float64", device="cpu",
              prefill_chunk_size=chunk, protect_recent=engine_recent)
    try:
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                  return_state=True, **params)
        return [o.outputs[0] for o in llm.generate(prompts, sampling, use_tqdm=False)]
    finally:
        llm.close()


def prompts() -> list[list[int]]:
    rng = random.Random(4)
    return [[rng.randrange(3, 90) for _ in range(n)] for n in (5, 17, 30)]


@pytest.mark.parametrize("recent", [3, 0.5, 7])
@pytest.mark.parametrize("chunk", [1, 64])
def test_the_latest_positions_always_stay(tiny_llama, recent, chunk):
    for prompt, out in zip(prompts(), run(tiny_llama, prompts(), chunk=chunk,
                                          protect_recent=recent), strict=True):
        fed = len(prompt) + len(out.token_ids) - 1  # the last sampled token is not fed
        count = min(int(recent * 8) if isinstance(recent, float) else recent, 8, fed)
        latest = set(range(fed - count, fed))
        for layer in out.state_positions:
            assert latest <= set(layer)


def test_zero_is_tova_and_the_whole_state_is_a_window(tiny_llama):
    tova = run(tiny_llama, prompts(), protect_recent=0)
    assert run(tiny_llama, prompts(), engine_recent=0) == tova
    # The default protects the latest half of the state: another state than the paper's.
    default = run(tiny_llama, prompts())
    assert run(tiny_llama, prompts(), protect_recent=0.5) == default
    assert [o.state_positions for o in default] != [o.state_positions for o in tova]
    llm = LLM(str(tiny_llama), state_size=8, dtype="float64", device="cpu", policy="window",
              prefill_chunk_size=1)
    try:
        sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                  return_state=True)
        window = [o.outputs[0] for o in llm.generate(prompts(), sampling, use_tqdm=False)]
    finally:
        llm.close()
    for everything in (8, 1.0, 100):
        protected = run(tiny_llama, prompts(), protect_recent=everything)
        assert [o.state_positions for o in protected] == [o.state_positions for o in window]
        assert [o.token_ids for o in protected] == [o.token_ids for o in window]
    assert [o.state_positions for o in tova] != [o.state_positions for o in window]


@pytest.mark.parametrize("whole_prefill", [False, True])
def test_recency_protected_tova_matches_the_slow_reference(tiny_llama, hf_tiny_llama,
                                                           whole_prefill):
    state_size, recent = 8, 3
    generated, positions = reference_decoder(hf_tiny_llama, state_size, "tova",
                                             protect_recent=recent).generate(
        PROMPT, 10, whole_prefill)
    for engine_recent, request_recent in ((recent, None), (None, recent)):
        [out] = run(tiny_llama, [PROMPT], state_size=state_size, max_tokens=10,
                    chunk=len(PROMPT) if whole_prefill else 1, engine_recent=engine_recent,
                    protect_recent=request_recent)
        assert out.token_ids == generated
        assert out.state_positions == positions


def test_builtins_are_declarations():
    assert POLICIES["h2o"] == Policy("h2o", score="accumulated", protect_recent=0.5)
    assert POLICIES["sink"].protect_first == 4
    assert make_policy("tova", 0.25).protect_recent == 0.25
    assert make_policy("tova").recent_count(512) == 256  # the default: the latest half
    assert make_policy("tova", 0).recent_count(512) == 0  # the paper's TOVA
    assert make_policy("h2o").recent_count(9) == 4
    assert make_policy("tova", 1000).recent_count(64) == 64


def test_bad_values_and_declarations_are_refused(tiny_llama):
    for bad in (-1, 1.5, "4", True):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(protect_recent=bad)
        assert info.value.param == "protect_recent"
    for policy in ("window", "full", "sink"):
        with pytest.raises(InvalidRequestError, match="protect_recent has no use"):
            EngineConfig(policy=policy, protect_recent=4)
    llm = LLM(str(tiny_llama), state_size=8, device="cpu", policy="window")
    try:
        with pytest.raises(InvalidRequestError) as info:
            llm.generate([[5, 6]], SamplingParams(max_tokens=2, protect_recent=2),
                         use_tqdm=False)
        assert info.value.param == "protect_recent"
    finally:
        llm.close()
    with pytest.raises(ValueError, match="score must be one of"):
        Policy("mine", score="surprise")
    with pytest.raises(ValueError, match="protect_first"):
        Policy("mine", protect_first=-2)

    class OwnScore(Policy):
        def scores(self, attn, positions, stats, newest, recent):
            return -attn

    with pytest.raises(ValueError, match=r"overrides Policy\.scores, which the Triton kernel"):
        check_kernel_runs(OwnScore("mine"))
    check_kernel_runs(Policy("mine", score="accumulated", protect_first=2, protect_recent=0.1))


def test_a_declared_policy_runs_through_the_engine(tiny_llama):
    """Sink-like protection of the first token plus TOVA scores with a recent window: the
    first position and the latest two always stay."""
    declared = Policy("first-and-recent", score="attention", protect_first=1, protect_recent=2)
    llm = LLM(str(tiny_llama), state_size=6, dtype="float64", device="cpu", policy=declared)
    try:
        sampling = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                  return_state=True)
        for prompt, output in zip(prompts(), llm.generate(prompts(), sampling, use_tqdm=False),
                                  strict=True):
            out = output.outputs[0]
            fed = len(prompt) + 9
            for layer in out.state_positions:
                assert {0, fed - 2, fed - 1} <= set(layer)
    finally:
        llm.close()
