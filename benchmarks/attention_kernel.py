"""The fused decode attention + eviction kernels alone, on Llama-3.1-8B shapes (32 query heads,
8 kv heads, head_dim 128, bf16), at the batch each state size gets in the throughput benchmark:
time per layer, and bandwidth against the K/V bytes it must read (every valid entry once),
for a sweep of the attention kernel's launch settings.

    python benchmarks/attention_kernel.py --out attention_kernel.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing
from roofline import measure_ceilings

from tova_engine.attention.fused import FusedDecodeAttention
from tova_engine.kernels import decode_attention
from tova_engine.model.config import ModelConfig
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import make_policy

SCENARIOS = (("full", 4096, 16), ("tova", 2048, 32), ("tova", 1024, 64), ("tova", 512, 128))
SCENARIOS += (("tova", 256, 256),)
SWEEP = {"block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (3,)}


def one_layer_state(policy_name: str, state_size: int, batch: int) -> tuple[KVState, tuple]:
    config = ModelConfig("llama", 128256, 4096, 14336, 1, 32, 8, 128, 1 << 20)
    policy = make_policy(policy_name)
    state = KVState(config, batch, state_size, torch.bfloat16, torch.device("cuda"), False)
    for t in (*state.k, *state.v):
        t.normal_()
    # Full rows (one short of full for `full`, which never evicts); distinct positions.
    entries = state_size - 1 if policy_name == "full" else state_size
    state.num_entries.fill_(entries)
    state.num_seen.fill_(2 * state_size)
    state.positions.copy_(torch.arange(state_size + 1).expand_as(state.positions))
    inputs = (
        torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16),
        torch.randn(batch, 8, 128, device="cuda", dtype=torch.bfloat16),
        torch.randn(batch, 8, 128, device="cuda", dtype=torch.bfloat16),
    )
    return state, (policy, entries, inputs)


def time_layer(state: KVState, policy, inputs) -> float:
    """Median milliseconds of one layer's two launches (the counters are not advanced, so
    every call sees the same entries)."""
    slots = torch.arange(state.num_seen.shape[0], device="cuda")
    attend = FusedDecodeAttention(state, policy, slots)
    return triton.testing.do_bench(lambda: attend(0, *inputs), warmup=25, rep=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    copy_rate = measure_ceilings(torch.device("cuda")).copy_bytes_per_s
    default = dict(decode_attention.TUNING)
    results = []
    for policy_name, state_size, batch in SCENARIOS:
        state, (policy, entries, inputs) = one_layer_state(policy_name, state_size, batch)
        must_read = batch * (entries + 1) * 8 * 128 * 2 * 2  # K and V, bf16
        for values in itertools.product(*SWEEP.values()):
            decode_attention.TUNING.update(zip(SWEEP, values, strict=True))
            ms = time_layer(state, policy, inputs)
            rate = must_read / (ms / 1e3)
            results.append(
                dict(
                    policy=policy_name,
                    state_size=state_size,
                    batch=batch,
                    **decode_attention.TUNING,
                    ms=ms,
                    tb_s=rate / 1e12,
                    pct_of_copy=100 * rate / copy_rate,
                )
            )
    decode_attention.TUNING.update(default)
    print(f"copy bandwidth {copy_rate / 1e12:.2f} TB/s")
    print("| policy | S | batch | block_n | warps | stages | us/layer | TB/s | % of copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['policy']} | {r['state_size']} | {r['batch']} | {r['block_n']} "
            f"| {r['num_warps']} | {r['num_stages']} | {1e3 * r['ms']:.1f} | {r['tb_s']:.2f} "
            f"| {r['pct_of_copy']:.0f}% |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_bytes_per_s": copy_rate, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
