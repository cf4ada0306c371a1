"""The decode-step roofline (benchmarks/roofline.py): the bytes a step must move, checked
against the closed form, and a sliding-window layer counted at its window, not the state size."""

from __future__ import annotations

from benchmarks.roofline import Ceilings, decode_step_cost
from tova_engine.model.config import ModelConfig

CEILINGS = Ceilings(copy_bytes_per_s=1e12, matmul_flops_per_s=1e15)


def config(**fields) -> ModelConfig:
    # vocab, hidden, intermediate, layers, heads, kv heads, head_dim, max positions
    return ModelConfig("llama", 1000, 64, 128, 6, 4, 2, 16, 1 << 20, **fields)


def test_every_layer_reads_its_entries_and_writes_one():
    plain = config()
    cost = decode_step_cost(plain, batch=8, entries=100, dtype_bytes=2, ceilings=CEILINGS)
    weights = decode_step_cost(plain, batch=8, entries=0, dtype_bytes=2, ceilings=CEILINGS)
    per_entry = 2 * 2 * 16 * 2  # K and V, 2 kv heads of 16, bf16
    assert cost.bytes - weights.bytes == 8 * 6 * 100 * per_entry


def test_a_sliding_layer_holds_its_window_only():
    layer_types = ("sliding_attention",) * 5 + ("full_attention",)
    gemma = config(sliding_window=33, layer_types=layer_types)
    plain = config()
    short = decode_step_cost(gemma, 8, 20, 2, CEILINGS)
    assert short.bytes == decode_step_cost(plain, 8, 20, 2, CEILINGS).bytes  # under the window
    long = decode_step_cost(gemma, 8, 1000, 2, CEILINGS)
    per_entry = 2 * 2 * 16 * 2
    weights = decode_step_cost(gemma, 8, 0, 2, CEILINGS).bytes
    # Five local layers hold window - 1 = 32 entries, the global one 1000; one new entry each.
    assert long.bytes - weights == 8 * (5 * 32 + 1000) * per_entry
