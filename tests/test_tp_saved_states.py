"""Saved states under tensor parallelism (CPU, gloo, float64): rank 0 gathers every rank's
key/value heads into one snapshot and gives each rank its block back on restore, so a
conversation continued over 2 ranks equals one request over the whole stream and the same
conversation on 1 rank, and a snapshot does not depend on the size it was saved at: the
2-rank snapshot equals the 1-rank one, and each continues under the other size."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import save_tiny_model
from tests.test_state_snapshots import continued_turn
from tests.test_state_snapshots import run as run_turn
from tova_engine import LLM

TURNS = 3


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    """8 query heads over 4 KV heads: 2 KV heads per rank at size 2."""
    return save_tiny_model(tmp_path_factory.mktemp("tp-states"), num_attention_heads=8,
                           num_key_value_heads=4)


def make_llm(model, tp: int, kv_cache_dtype: str) -> LLM:
    return LLM(str(model), state_size=6, policy="h2o", dtype="float64", device="cpu",
               prefill_chunk_size=1, max_num_seqs=4, tensor_parallel_size=tp,
               kv_cache_dtype=kv_cache_dtype)


def conversation(llm: LLM) -> list:
    """TURNS turns, each continued from the last one's saved state and checked against one
    request over everything said so far; the turns' outputs."""
    rng = random.Random(7)
    stream: list[int] = []
    state, outs = None, []
    for turn in range(TURNS):
        new = [rng.randrange(3, 96) for _ in range(4 + turn)]
        out = continued_turn(llm, stream, new, state, max_tokens=4)
        state = out.state
        outs.append(out)
    return outs


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """float8 compared by its bytes (the values are stored, not computed); float64 to its
    rounding: the ranks' partial sums add up in another order."""
    if a.dtype != torch.float64:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.allclose(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_a_conversation_over_two_ranks_equals_one_rank(four_kv_heads, kv_cache_dtype):
    with make_llm(four_kv_heads, 1, kv_cache_dtype) as one:
        single = conversation(one)
        with make_llm(four_kv_heads, 2, kv_cache_dtype) as two:
            double = conversation(two)
            for a, b in zip(single, double, strict=True):
                assert b.outputs[0].token_ids == a.outputs[0].token_ids
                assert b.outputs[0].state_positions == a.outputs[0].state_positions
            saved_one, saved_two = single[0].state, double[0].state
            # Every head, in the model's order, whatever the size it was saved at.
            assert saved_two.k[0].shape[0] == 4
            for name in ("k", "v", "positions", "stats", "k_scale", "v_scale"):
                got, want = getattr(saved_two, name), getattr(saved_one, name)
                assert (got is None) == (want is None), name
                for g, w in zip(got or (), want or (), strict=True):
                    assert equal(g, w), name
            # Each continues under the other size, as under its own.
            follow = [11, 12, 13]
            for state in (saved_one, saved_two):
                outs = [run_turn(llm, follow, max_tokens=4, resume=state, keep=False)
                        for llm in (one, two)]
                assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
                assert outs[0].outputs[0].state_positions == outs[1].outputs[0].state_positions

