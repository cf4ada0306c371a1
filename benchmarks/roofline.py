"""What a decode step must cost at least on this GPU: the bytes it must move (weights, the
state it reads, the entries it writes) over the measured copy bandwidth, and its FLOPs over
the measured bf16 matmul rate. The larger of the two is the roofline limit of the step."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch

from tova_engine.model.config import ModelConfig
from tova_engine.state.kv_state import layer_state_sizes


class Ceilings(NamedTuple):
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written
    matmul_flops_per_s: float  # bf16 (CPU: float32) matrix product on random data


class StepCost(NamedTuple):
    bytes: float
    flops: float
    memory_s: float
    compute_s: float

    @property
    def limit_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds per call, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _copy_rate(device: torch.device, dtype: torch.dtype) -> float:
    elements = 2**30 if device.type == "cuda" else 2**24  # 2 GiB of bf16: far past the L2
    src = torch.randn(elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), 10, device)
    return 2 * src.numel() * src.element_size() / seconds


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return 2 * size**3 / _time(lambda: a @ b, 10, device)


def measure_ceilings(device: torch.device) -> Ceilings:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Ceilings(_copy_rate(device, dtype), _matmul_rate(device, dtype))


def weight_counts(c: ModelConfig) -> tuple[int, int]:
    """(parameters read by a decode step, parameters in its matrix products)."""
    qkv = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    out = c.num_heads * c.head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_layers * (qkv + out + mlp) + c.vocab_size * c.hidden_size  # + LM head
    norms = (2 * c.num_layers + 1) * c.hidden_size
    # The embedding table is only gathered from (a few rows), unless the LM head shares it.
    return matmul + norms, matmul


def decode_step_cost(
    c: ModelConfig, batch: int, entries: float, dtype_bytes: int, ceilings: Ceilings
) -> StepCost:
    """One decode step of `batch` rows, each attending over `entries` state entries + 1 (a
    sliding-window layer over at most its window's, as the state holds them)."""
    read_params, matmul_params = weight_counts(c)
    head_bytes = c.num_kv_heads * c.head_dim * dtype_bytes
    layer_entries = [min(entries, cap) for cap in layer_state_sizes(c, math.inf)]
    attended = sum(layer_entries) + c.num_layers  # the new token included, every layer
    moved = (
        read_params * dtype_bytes
        + batch * attended * 2 * head_bytes  # K and V read
        + batch * c.num_layers * 2 * head_bytes  # the new entry written
    )
    flops = 2 * batch * matmul_params + 4 * batch * c.num_heads * c.head_dim * attended
    return StepCost(
        moved,
        flops,
        moved / ceilings.copy_bytes_per_s,
        flops / ceilings.matmul_flops_per_s,
    )
