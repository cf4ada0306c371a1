"""Will the state fit? Checked once the weights are loaded and before `KVState` allocates.

The state is allocated once, for every slot, so a configuration that does not fit must fail
at start-up with numbers, not be killed by the OOM killer. `max_num_seqs="auto"` takes as
many slots as `memory_utilization` allows (vLLM's `gpu_memory_utilization`):

    weights + state(slots) + activations(slots) <= memory_utilization * total
    state(slots) + activations(slots) <= free now

CUDA: total is the device's memory and free is `torch.cuda.mem_get_info` (plus what the
caching allocator holds unused). CPU: free is the RAM available now (MemAvailable, or the
cgroup's headroom when that is smaller) and total is that plus the loaded weights, i.e. the
RAM that was available to this engine before it loaded them. An explicit max_num_seqs is
checked against free memory only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from tova_engine.config import EngineConfig
from tova_engine.model.config import ModelConfig
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import make_policy

logger = logging.getLogger("tova_engine")

# More slots than any step batches usefully; "auto" stops here even with memory to spare.
AUTO_MAX_NUM_SEQS = 1024
# The default prefix cache's most rows when it fills the memory left (leftover_cache_rows).
MAX_CACHE_ROWS = 4096
# What the activation estimate leaves out: CUDA graph pools, cuBLAS/Triton workspaces,
# allocator fragmentation (CUDA); interpreter and tokenizer growth (CPU).
FIXED_RESERVE = {"cuda": 1 << 30, "cpu": 256 << 20}
_GiB, _MiB = 1 << 30, 1 << 20


class DeviceMemory(NamedTuple):
    free: int  # bytes this process can still allocate, with the weights already loaded
    total: int  # bytes memory_utilization is a fraction of (weights included)


class StateFootprint(NamedTuple):
    slot_bytes: int  # one slot: K/V with the scratch entry, positions, statistics, counters
    spare_rows: int  # rows allocated beyond max_num_seqs (the CUDA graphs' padding slot)
    config: EngineConfig  # how many prefix-cache rows go with a number of slots

    def cache_rows(self, slots: int) -> int:
        return self.config.prefix_cache_rows(slots, self.slot_bytes)

    def bytes_for(self, slots: int) -> int:
        """The slots, the spare row and the prefix cache's rows."""
        return (slots + self.spare_rows + self.cache_rows(slots)) * self.slot_bytes


def state_footprint(
    config: EngineConfig, model_config: ModelConfig, state_size: int | None = None
) -> StateFootprint:
    """What `KVState` allocates for this config, measured on a one-slot state on the meta
    device (no memory): its constructor stays the one definition of the layout."""
    track_stats = make_policy(config.policy).uses_stats
    one = KVState(
        model_config,
        1,
        state_size or config.state_size,
        config.torch_dtype,
        torch.device("meta"),
        track_stats=track_stats,
        kv_cache_dtype=config.kv_cache_dtype,
    )
    # The engine pads graph batches into a spare slot whenever it replays CUDA graphs.
    return StateFootprint(one.total_bytes(), 1 if config.use_cuda_graphs else 0, config)


def activation_bytes(
    config: EngineConfig, model_config: ModelConfig, slots: int, state_size: int | None = None
) -> int:
    """An upper estimate of one step's temporaries with `slots` sequences, plus the fixed
    reserve: hidden states of every token in the step's budget, float32 logits with the
    sampler's sorted copies, and the unfused prefill attention scores (H2O, CPU).

    On an H200 (bf16, full prefill chunks, top-p, prompt log-probs) the memory in use beyond
    weights and state after such steps, graphs included, was 0.8-2.8 GiB where this gave
    2.1-6.3 GiB (SmolLM2 and Llama-3-8B shapes, 64-1024 slots)."""
    c = model_config
    size = state_size or config.state_size
    dtype_bytes = config.torch_dtype.itemsize
    budget = config.token_budget_for(slots)
    chunk = min(config.prefill_chunk_size, budget)
    per_token = 4 * c.hidden_size + 2 * (c.num_heads + c.num_kv_heads) * c.head_dim
    hidden = budget * (per_token + 3 * c.intermediate_size) * dtype_bytes
    # Sampled rows (one per sequence) and a chunk's prompt log-probs: logits, sorted values,
    # int64 order, probabilities, cumulative sum.
    sampler = (min(slots, budget) + chunk) * c.vocab_size * 32
    rows = min(slots, max(1, budget // chunk))
    scores = 2 * rows * c.num_heads * chunk * (size + chunk) * 4  # logits + softmax, float32
    return hidden + sampler + scores + FIXED_RESERVE[config.torch_device.type]


def resolve_config(
    config: EngineConfig,
    model_config: ModelConfig,
    weight_bytes: int,
    memory: DeviceMemory | None = None,
    fill_prefix_cache: bool = False,
) -> EngineConfig:
    """`config` with an integer max_num_seqs whose state fits; ValueError when none does.

    memory: what the device has now (default: measured); tests pass their own figures.
    fill_prefix_cache: with prefix_cache_bytes unset, the prefix cache takes what
    memory_utilization leaves once the slots are placed (`leftover_cache_rows`)."""
    memory = memory or device_memory(config.torch_device, weight_bytes)
    resolved = _resolve_slots(config, model_config, weight_bytes, memory)
    if fill_prefix_cache and config.prefix_cache_bytes is None:
        footprint = state_footprint(resolved, model_config)
        rows = leftover_cache_rows(resolved, model_config, weight_bytes, memory)
        if rows > footprint.cache_rows(resolved.num_slots):
            logger.info(
                "prefix cache: %d rows (%s), what memory_utilization %.2f leaves beside the "
                "slots (--prefix-cache-bytes sets it)", rows, _size(rows * footprint.slot_bytes),
                config.memory_utilization)
            resolved = resolved.replace(prefix_cache_bytes=rows * footprint.slot_bytes)
    return resolved


def leftover_cache_rows(
    config: EngineConfig, model_config: ModelConfig, weight_bytes: int, memory: DeviceMemory
) -> int:
    """Prefix-cache rows for the default on one GPU (vLLM's prefix cache lives in the
    memory its KV cache does not use): the default share (1/16 of the slots) and as many
    more as memory_utilization leaves after weights, slots and activations, at most
    MAX_CACHE_ROWS."""
    slots = config.num_slots
    footprint = state_footprint(config, model_config)
    allowed = int(config.memory_utilization * memory.total) - weight_bytes
    spare = min(allowed, memory.free) - _needed(config, model_config, slots)
    extra = max(0, spare) // footprint.slot_bytes
    return min(MAX_CACHE_ROWS, footprint.cache_rows(slots) + extra)


def _resolve_slots(
    config: EngineConfig, model_config: ModelConfig, weight_bytes: int, memory: DeviceMemory
) -> EngineConfig:
    if config.max_num_seqs != "auto":
        check_fits(config, model_config, memory)
        return config
    slots = _auto_slots(config, model_config, weight_bytes, memory)
    footprint = state_footprint(config, model_config)
    logger.info(
        "max_num_seqs auto: %d slots of state_size %d (%s each, %s in all; memory_utilization "
        "%.2f of %s)",
        slots,
        config.state_size,
        _size(footprint.slot_bytes),
        _size(footprint.bytes_for(slots)),
        config.memory_utilization,
        _size(memory.total),
    )
    return config.replace(max_num_seqs=slots)


def check_fits(config: EngineConfig, model_config: ModelConfig, memory: DeviceMemory) -> None:
    slots = config.num_slots
    footprint = state_footprint(config, model_config)
    reserve = activation_bytes(config, model_config, slots)
    needed = footprint.bytes_for(slots)
    if needed + reserve <= memory.free:
        return
    fewer = _largest(slots - 1, lambda n: _needed(config, model_config, n) <= memory.free)
    smaller = _largest(
        config.state_size - 1,
        lambda s: _needed(config, model_config, slots, s) <= memory.free,
    )
    advice = [f"max_num_seqs to {fewer}"] if fewer else []
    advice += [f"state_size to {smaller}" if smaller else "state_size"]
    raise ValueError(
        f"state needs {_size(needed)} for {slots} slots of state_size {config.state_size} "
        f"({_size(footprint.slot_bytes)} each) and {footprint.cache_rows(slots)} prefix-cache "
        f"rows but {_size(max(memory.free - reserve, 0))} "
        f"is available ({_size(memory.free)} free on {config.torch_device.type}, less "
        f"{_size(reserve)} for activations); lower {' or '.join(advice)}, "
        "or use max_num_seqs='auto'"
    )


def _auto_slots(
    config: EngineConfig, model_config: ModelConfig, weight_bytes: int, memory: DeviceMemory
) -> int:
    allowed = int(config.memory_utilization * memory.total) - weight_bytes
    budget = min(allowed, memory.free)
    cap = min(AUTO_MAX_NUM_SEQS, config.max_num_batched_tokens or AUTO_MAX_NUM_SEQS)
    slots = _largest(cap, lambda n: _needed(config, model_config, n) <= budget)
    if slots:
        return slots
    smaller = _largest(
        config.state_size - 1, lambda s: _needed(config, model_config, 1, s) <= budget
    )
    raise ValueError(
        f"max_num_seqs='auto': not even one slot of state_size {config.state_size} "
        f"({_size(state_footprint(config, model_config).slot_bytes)}) fits: "
        f"memory_utilization {config.memory_utilization} of {_size(memory.total)} less "
        f"{_size(weight_bytes)} of weights leaves {_size(max(allowed, 0))} "
        f"({_size(memory.free)} is free), and activations need "
        f"{_size(activation_bytes(config, model_config, 1))}; lower state_size"
        f"{f' to {smaller}' if smaller else ''} or raise memory_utilization"
    )


def _needed(
    config: EngineConfig, model_config: ModelConfig, slots: int, state_size: int | None = None
) -> int:
    footprint = state_footprint(config, model_config, state_size)
    return footprint.bytes_for(slots) + activation_bytes(config, model_config, slots, state_size)


def _largest(high: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [1, high] with fits(n) (fits is monotone), or 0 when none."""
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers; `parameters()` yields a tied weight once."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def device_memory(device: torch.device, weight_bytes: int) -> DeviceMemory:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Blocks the caching allocator holds unused are this process's to reuse.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return DeviceMemory(free, total)
    free = available_ram()
    return DeviceMemory(free, free + weight_bytes)


def available_ram() -> int:
    """RAM that can be allocated without swapping: MemAvailable, or the cgroup's headroom
    when a container limit is tighter (MemAvailable reports the host's memory)."""
    meminfo = _meminfo()
    available = meminfo.get("MemAvailable")
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


def _meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        number, *unit = value.split()
        fields[name] = int(number) * (1024 if unit == ["kB"] else 1)
    return fields


# (limit, usage, stat) files of cgroup v2 and v1; "max" or a huge number means no limit.
_CGROUPS = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat"),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
    ),
)


def _cgroup_headroom(root: Path = Path("/")) -> int | None:
    """Bytes below this cgroup's memory limit, not counting reclaimable page cache."""
    for limit_file, usage_file, stat_file in _CGROUPS:
        try:
            limit = (root / limit_file.lstrip("/")).read_text().strip()
            usage = int((root / usage_file.lstrip("/")).read_text())
            stat = (root / stat_file.lstrip("/")).read_text().split()
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        stats = dict(zip(stat[::2], stat[1::2], strict=False))
        cache = int(stats.get("inactive_file", stats.get("total_inactive_file", 0)))
        return int(limit) - (usage - cache)
    return None


def _size(nbytes: int) -> str:
    if abs(nbytes) >= _GiB:
        return f"{nbytes / _GiB:.1f} GiB"
    return f"{math.ceil(nbytes / _MiB)} MiB"
