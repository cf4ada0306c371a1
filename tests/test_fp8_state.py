"""The float8 state (`kv_cache_dtype="fp8"`, state/fp8_buffer.py) on CPU: storage round trips
within e4m3's rounding, attention over it close to the float state's, and every copy of a
state (forks, the prefix cache, saved states and their files) exact: the outputs with the
prefix cache on and off, and a continued conversation against one request over the whole
stream, are identical on the float8 state as on a float one."""

from __future__ import annotations

import random

import pytest
import torch

from tests.test_prefix_cache import GREEDY as CACHE_GREEDY
from tests.test_prefix_cache import make_llm as make_cache_llm
from tests.test_prefix_cache import run as run_cache
from tests.test_state_snapshots import continued_turn
from tests.test_state_snapshots import run as run_turn
from tova_engine import LLM, EngineConfig, InvalidRequestError, SamplingParams, StateSnapshot
from tova_engine.execution.memory import state_footprint
from tova_engine.model.registry import config_from_hf
from tova_engine.state.fp8_buffer import FP8, Fp8KV, quantize_vectors
from tova_engine.state.kv_state import KVState


def test_vectors_round_trip_within_e4m3_rounding():
    torch.manual_seed(0)
    # Head vectors of every magnitude: each keeps 3 mantissa bits whatever its scale.
    values = torch.randn(3, 2, 9, 16) * torch.logspace(-4, 2, 9)[None, None, :, None]
    buffer = Fp8KV((3, 2, 10, 16), torch.float32, torch.device("cpu"))
    buffer[:, :, :9] = values
    back = buffer[:, :, :9]
    assert back.dtype == torch.float32 and buffer.data.dtype == FP8
    vector_max = values.abs().amax(dim=-1, keepdim=True)
    bound = values.abs() * 2.0**-4 + vector_max / 448 * 2.0**-10
    assert ((back - values).abs() <= bound * 1.0001).all()
    assert torch.equal(buffer.data[:, :, :9].float().abs().amax(dim=-1),
                       torch.full((3, 2, 9), 448.0))


def test_zero_vectors_stay_zero():
    quantized, scale = quantize_vectors(torch.zeros(4, 8))
    assert torch.equal(quantized.float(), torch.zeros(4, 8)) and (scale > 0).all()


def test_rows_copy_as_stored():
    buffer = Fp8KV((4, 2, 6, 8), torch.bfloat16, torch.device("cpu"))
    buffer[1] = torch.randn(2, 6, 8)
    buffer.copy_rows(3, 1)
    assert torch.equal(buffer.data[3].view(torch.uint8), buffer.data[1].view(torch.uint8))
    assert torch.equal(buffer.scale[3], buffer.scale[1])


def make_llm(model, kv: str, **options) -> LLM:
    settings = dict(state_size=8, dtype="float32", device="cpu", prefill_chunk_size=4,
                    max_num_seqs=4, kv_cache_dtype=kv)
    return LLM(str(model), **settings | options)


@pytest.mark.parametrize("chunk", [1, 4])
def test_attention_over_the_float8_state_follows_the_float_state(tiny_llama, chunk):
    """Without evictions (which turn on near-ties of the scores), the float8 state moves the
    first token's log-prob by a few e4m3 steps at most, per-token and chunked."""
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 96) for _ in range(n)] for n in (20, 13)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    outs = {kv: make_llm(tiny_llama, kv, state_size=64, prefill_chunk_size=chunk)
            .generate(prompts, params, use_tqdm=False) for kv in ("auto", "fp8")}
    for a, b in zip(outs["auto"], outs["fp8"], strict=True):
        first = a.outputs[0].token_ids[0]
        assert b.outputs[0].token_ids[0] == first
        assert abs(b.outputs[0].logprobs[0][first].logprob
                   - a.outputs[0].logprobs[0][first].logprob) < 0.05


@pytest.mark.parametrize("chunk", [1, 8])
def test_the_prefix_cache_is_exact_on_the_float8_state(tiny_llama, chunk):
    options = dict(kv_cache_dtype="fp8", prefill_chunk_size=chunk, dtype="float32")
    cold, _ = run_cache(make_cache_llm(tiny_llama, cache=False, **options), CACHE_GREEDY)
    warm, cached = run_cache(make_cache_llm(tiny_llama, cache=True, **options), CACHE_GREEDY)
    assert warm == cold and sum(cached) > 0


def test_n_choices_fork_the_float8_state_exactly(tiny_llama):
    """n = 2 copies the prefilled slot as stored: greedy, both choices are the one-choice
    request's, token for token and position for position."""
    llm = make_llm(tiny_llama, "fp8")
    prompt = list(range(5, 25))
    params = dict(max_tokens=6, temperature=0, ignore_eos=True, return_state=True)
    one = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    pair = llm.generate([prompt], SamplingParams(n=2, **params), use_tqdm=False)[0].outputs
    for choice in pair:
        assert choice.token_ids == one.token_ids
        assert choice.state_positions == one.state_positions


def test_a_conversation_continues_exactly_from_a_float8_state(tiny_llama, tmp_path):
    """Saved as stored (float8 values and scales, also through a file): turn after turn the
    continued conversation equals one request over the whole stream."""
    llm = make_llm(tiny_llama, "fp8", prefill_chunk_size=1)
    rng = random.Random(2)
    stream: list[int] = []
    state = None
    for turn in range(3):
        new = [rng.randrange(3, 96) for _ in range(5 + turn)]
        state = continued_turn(llm, stream, new, state, max_tokens=5).state
        assert state.spec.kv_cache_dtype == "fp8" and state.k[0].dtype == FP8
        assert state.k_scale is not None and state.k_scale[0].shape == state.k[0].shape[:-1]
        path = tmp_path / f"turn{turn}.safetensors"
        state.save(path)
        loaded = StateSnapshot.load(path)
        for name in ("k", "v", "k_scale", "v_scale", "positions"):
            for got, want in zip(getattr(loaded, name), getattr(state, name), strict=True):
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        state = loaded


def test_a_float8_state_is_refused_by_a_float_engine(tiny_llama):
    state = run_turn(make_llm(tiny_llama, "fp8"), list(range(5, 12)), max_tokens=2).state
    other = make_llm(tiny_llama, "auto")
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype 'fp8'"):
        other.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False,
                       resume_from=state)


def test_slots_take_about_half_the_bytes_of_bfloat16():
    """Llama-3.1-8B's shapes: 128 float8 values and a float32 scale per head vector against
    256 bytes, so --max-num-seqs auto fits 1.94x the slots."""
    config = config_from_hf({"model_type": "llama", "hidden_size": 4096,
                             "intermediate_size": 14336, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 8,
                             "vocab_size": 128256, "max_position_embeddings": 8192})
    per = {kv: KVState.bytes_per_sequence(config, 512, torch.bfloat16, kv == "fp8")
           for kv in ("auto", "fp8")}
    assert per["auto"] == 2 * 32 * 8 * 512 * 128 * 2
    assert per["fp8"] / per["auto"] == pytest.approx(132 / 256)
    slot = {kv: state_footprint(EngineConfig(kv_cache_dtype=kv, dtype="bfloat16"), config)
            .slot_bytes for kv in ("auto", "fp8")}
    assert slot["fp8"] < 0.53 * slot["auto"]


def test_the_setting_is_validated():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        EngineConfig(kv_cache_dtype="int8")
