"""The Triton kernels against the PyTorch path on random states (CUDA; skipped without it).

The fused decode attention must give the reference's output within the dtype's tolerance,
evict the same entry wherever the float64 minimum is unique by a margin that rounding cannot
bridge, and leave every valid entry, position, H2O statistic and counter as the reference does.
"""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch

from tests.elementwise_checks import check_elementwise_kernels
from tova_engine.attention.pytorch import DecodeAttention
from tova_engine.model.config import ModelConfig
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy, make_policy

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
# Relative error of the attention output, and the score gap below which a different
# eviction is forgiven (relative to the minimum score), per dtype.
OUTPUT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SCORE_MARGIN = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
SHAPES = {  # (query heads, kv heads, head_dim)
    "tiny": (4, 2, 16),
    "smollm2": (9, 3, 64),
    "llama8b": (32, 8, 128),
}


def random_state(shape, policy, state_size, batch, dtype, generator) -> tuple[KVState, list]:
    """Rows of every kind: full, empty, half full, a smaller capacity; slots out of order."""
    heads, kv_heads, head_dim = shape
    config = ModelConfig("llama", 100, 64, 96, 2, heads, kv_heads, head_dim, 1 << 20)
    rows = batch + 2
    state = KVState(
        config, rows, state_size, dtype, torch.device(DEVICE), policy.uses_stats, pad_slot=True
    )
    for t in (*state.k, *state.v):
        t.copy_(torch.randn(t.shape, generator=generator))
    slots = torch.randperm(rows, generator=generator)[:batch].tolist()
    entries = torch.randint(0, state_size + 1, (rows,), generator=generator)
    capacity = torch.full((rows,), state_size)
    entries[slots[0]] = state_size
    if batch > 1:
        entries[slots[1]] = 0
    if batch > 2:
        capacity[slots[2]] = max(1, state_size // 2)
    entries = torch.minimum(entries, capacity)
    seen = entries + torch.randint(0, 3 * state_size, (rows,), generator=generator)
    state.num_entries[:rows] = entries
    state.capacity[:rows] = capacity
    state.protect_recent[:rows] = torch.tensor([policy.recent_count(int(c)) for c in capacity])
    state.num_seen[:rows] = seen
    for layer in range(config.num_layers):
        for row in range(rows):
            # Distinct past positions, the row's newest token excluded.
            held = torch.randperm(int(seen[row]), generator=generator)[: state_size + 1]
            state.positions[layer, row, : held.numel()] = held
    if state.stats is not None:
        state.stats.copy_(torch.rand(state.stats.shape, generator=generator))
    return state, slots


def float64_scores(state, policy, layer, slots, q, k) -> list[torch.Tensor]:
    """The policy's scores for each row's valid entries plus the new token, in float64."""
    scores = []
    for row, slot in enumerate(slots):
        n = int(state.num_entries[slot])
        keys = torch.cat((state.k[layer][slot, :, :n], k[row][:, None]), dim=1).double()
        kv_heads = keys.shape[0]
        queries = q[row].double().view(kv_heads, -1, keys.shape[-1])  # [Hkv, G, D]
        logits = queries @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1])
        attn = logits.softmax(dim=-1).mean(dim=(0, 1))  # [n + 1]
        newest = state.num_seen[slot : slot + 1]
        positions = torch.cat((state.positions[layer, slot, :n], newest))
        stats = None
        if state.stats is not None:
            stats = torch.cat((state.stats[layer, slot, :n].double(), attn.new_zeros(1))) + attn
        recent = state.protect_recent[slot : slot + 1]
        stats = None if stats is None else stats[None]
        score = policy.scores(attn[None], positions[None], stats, newest, recent)
        scores.append(score.reshape(-1).double())
    return scores


def evicted_index(state, layer, slot) -> int | None:
    """Where the newest token landed, or None when it was dropped."""
    n = int(state.num_entries[slot])
    hits = (state.positions[layer, slot, :n] == state.num_seen[slot] - 1).nonzero()
    return int(hits[0]) if hits.numel() else None


# The built-ins, TOVA with recency protection, and a policy declared here.
POLICIES_UNDER_TEST = {
    **{name: make_policy(name) for name in ("tova", "h2o", "sink", "window", "full")},
    "tova-recent": make_policy("tova", 0.25),
    "declared": Policy("declared", score="accumulated", protect_first=2, protect_recent=3),
}


@pytest.mark.parametrize("policy_name", list(POLICIES_UNDER_TEST))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("batch,state_size", [(1, 300), (6, 40), (64, 130)])
def test_fused_decode_matches_pytorch(policy_name, dtype, shape_name, batch, state_size):
    from tova_engine.attention.fused import FusedDecodeAttention

    generator = torch.Generator().manual_seed(
        zlib.crc32(f"{policy_name}{batch}{shape_name}".encode())
    )
    policy = POLICIES_UNDER_TEST[policy_name]
    shape = SHAPES[shape_name]
    reference, slots = random_state(shape, policy, state_size, batch, dtype, generator)
    fused = copy.deepcopy(reference)
    heads, kv_heads, head_dim = shape
    before = copy.deepcopy(reference)
    ref_attend = DecodeAttention(reference, policy, slots)
    fused_attend = FusedDecodeAttention(fused, policy, torch.tensor(slots, device=DEVICE))
    for layer in range(reference.num_layers):
        q = torch.randn(batch, heads, head_dim, generator=generator).to(DEVICE, dtype)
        k = torch.randn(batch, kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
        v = torch.randn(batch, kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
        expected = ref_attend(layer, q, k, v).double()
        got = fused_attend(layer, q, k, v).double()
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < OUTPUT_TOLERANCE[dtype], (layer, error)
        scores = float64_scores(before, policy, layer, slots, q, k)
        ref_ages = ref_attend.evicted_ages[layer].tolist()
        fused_ages = fused_attend.evicted_ages[layer].tolist()
        for row, slot in enumerate(slots):
            full = int(before.num_entries[slot]) >= int(before.capacity[slot])
            if not full:
                assert ref_ages[row] == fused_ages[row] == -1
                continue
            ordered = scores[row].sort().values
            unique = len(ordered) < 2 or (
                ordered[1] - ordered[0] > SCORE_MARGIN[dtype] * ordered[0].abs() + 1e-12
            )
            if unique or not math.isfinite(ordered[0]):
                assert fused_ages[row] == ref_ages[row], (layer, row, scores[row][:8])
    ref_attend.finish()
    fused_attend.finish()
    assert torch.equal(reference.num_entries, fused.num_entries)
    assert torch.equal(reference.num_seen, fused.num_seen)
    for layer in range(reference.num_layers):
        for row, slot in enumerate(slots):
            if ref_attend.evicted_ages[layer][row] != fused_attend.evicted_ages[layer][row]:
                continue  # a near-tie broken the other way: the rest of the row differs too
            n = int(reference.num_entries[slot])
            held = (reference.positions[layer, slot, :n], fused.positions[layer, slot, :n])
            assert torch.equal(*held)
            assert torch.equal(reference.k[layer][slot, :, :n], fused.k[layer][slot, :, :n])
            assert torch.equal(reference.v[layer][slot, :, :n], fused.v[layer][slot, :, :n])
            if reference.stats is not None:
                torch.testing.assert_close(
                    fused.stats[layer, slot, :n], reference.stats[layer, slot, :n],
                    rtol=OUTPUT_TOLERANCE[dtype], atol=1e-4,
                )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_elementwise_kernels_match_pytorch(dtype):
    """Norms of both styles, RoPE with and without q/k norms, both gated activations."""
    assert check_elementwise_kernels(DEVICE, dtype) == 24
