"""Every policy, the built-ins and one declared here, keeps the same entries on the two PyTorch
attention paths: the decode path (`DecodeAttention`, one token per row) and the chunked-prefill
path (`ChunkAttention`) fed one-token chunks, in float64, token after token, with the same
queries, keys and values. (The fused Triton kernel and CUDA-graph replay are compared with the
decode path in tests/test_kernels_gpu.py and tests/test_kernels_interpreted.py.)"""

from __future__ import annotations

import pytest
import torch

from tova_engine.attention.pytorch import ChunkAttention, DecodeAttention
from tova_engine.model.config import ModelConfig
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy, make_policy

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 8, 2
POLICIES = {
    **{name: make_policy(name) for name in ("tova", "h2o", "sink", "window")},
    "tova-paper": make_policy("tova", 0),
    "tova-recent-3": make_policy("tova", 3),
    "declared": Policy("declared", score="accumulated", protect_first=2, protect_recent=0.25),
}


def new_state(policy: Policy, state_size: int) -> KVState:
    config = ModelConfig("llama", 100, 32, 64, LAYERS, HEADS, KV_HEADS, HEAD_DIM, 1 << 16)
    state = KVState(config, 1, state_size, torch.float64, torch.device("cpu"),
                    policy.uses_stats)
    state.reset_slot(0, state_size, policy.recent_count(state_size))
    return state


def held(state: KVState) -> list[list[int]]:
    return state.retained_positions(0)


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("state_size", [5, 8])
def test_decode_and_one_token_chunks_keep_the_same_entries(name, state_size):
    policy = POLICIES[name]
    decoded, chunked = new_state(policy, state_size), new_state(policy, state_size)
    generator = torch.Generator().manual_seed(state_size)
    for position in range(3 * state_size):
        q = torch.randn(1, HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
        k = torch.randn(1, KV_HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
        v = torch.randn(1, KV_HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
        decode = DecodeAttention(decoded, policy, [0])
        entries = int(chunked.num_entries[0])
        chunk = ChunkAttention(chunked, policy, [0], entries, position, 1, state_size)
        for layer in range(LAYERS):
            out_decode = decode(layer, q, k, v)
            out_chunk = chunk(layer, q, k, v)
            torch.testing.assert_close(out_chunk, out_decode, rtol=1e-12, atol=1e-12)
        decode.finish()
        chunk.finish()
        assert held(chunked) == held(decoded), f"after position {position}"
        if policy.uses_stats:  # accumulated attention per retained position, both paths
            for layer in range(LAYERS):
                count = int(decoded.num_entries[0])
                by_position = [
                    dict(zip(s.positions[layer, 0, :count].tolist(),
                             s.stats[layer, 0, :count].tolist(), strict=True))
                    for s in (decoded, chunked)
                ]
                assert by_position[1] == pytest.approx(by_position[0], rel=1e-12)
    # The state evicted throughout, and the policy's protected entries stayed.
    last = 3 * state_size - 1
    recent = policy.recent_count(state_size)
    for layer in held(decoded):
        assert len(layer) == state_size
        assert set(range(last - recent + 1, last + 1)) <= set(layer)
        assert set(range(policy.protect_first)) <= set(layer)
