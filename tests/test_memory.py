"""Does the state fit? memory.py's arithmetic with injected memory figures: no test here
allocates more than a few kilobytes of state."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.conftest import write_files
from tova_engine.config import EngineConfig
from tova_engine.execution import memory
from tova_engine.execution.memory import (
    AUTO_MAX_NUM_SEQS,
    DeviceMemory,
    activation_bytes,
    check_fits,
    resolve_config,
    state_footprint,
)
from tova_engine.model.config import ModelConfig
from tova_engine.model.llama import LlamaModel
from tova_engine.state.kv_state import KVState

GiB = 1 << 30
# SmolLM2-135M's shapes (the embedded default model), without loading it.
SMOLLM2 = ModelConfig(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
    tie_word_embeddings=True,
)
TINY = ModelConfig(
    model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
)
# The README's OOM: 64 slots of 4096 float64 entries of SmolLM2 need ~23 GiB.
BIG = EngineConfig(state_size=4096, policy="full", dtype="float64", device="cpu")


def needed(config: EngineConfig, model_config: ModelConfig, slots: int) -> int:
    """What the module promises a config with `slots` slots needs: state + activations."""
    footprint = state_footprint(config, model_config)
    return footprint.bytes_for(slots) + activation_bytes(config, model_config, slots)


# ----- the state's bytes --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_footprint_is_what_kv_state_allocates(policy):
    config = EngineConfig(state_size=16, policy=policy, device="cpu")
    state = KVState(TINY, 3, 16, torch.float32, torch.device("cpu"), track_stats=policy == "h2o")
    assert state_footprint(config, TINY).bytes_for(3) == state.total_bytes()


def test_slot_bytes_count_scratch_entry_positions_and_statistics():
    # Per slot: K and V of 2 layers x 2 kv heads x 17 entries (16 + scratch) x 16 dims in
    # float32, an int64 position per layer and entry, 4 int64 counters (entries, seen,
    # capacity, protected latest positions).
    kv = 2 * 2 * 2 * 17 * 16 * 4
    expected = kv + 2 * 17 * 8 + 4 * 8
    config = EngineConfig(state_size=16, device="cpu")
    assert state_footprint(config, TINY).slot_bytes == expected
    assert KVState.bytes_per_sequence(TINY, 17, torch.float32) == kv
    # H2O also keeps a float32 accumulated score per layer and entry.
    h2o = state_footprint(config.replace(policy="h2o"), TINY).slot_bytes
    assert h2o == expected + 2 * 17 * 4


# ----- a state that cannot fit --------------------------------------------------------------


def test_state_that_cannot_fit_is_refused_with_both_settings_named():
    free = int(21.3 * GiB)
    with pytest.raises(ValueError) as info:
        resolve_config(BIG, SMOLLM2, weight_bytes=10**9, memory=DeviceMemory(free, free))
    message = str(info.value)
    assert "state_size 4096" in message and "64 slots" in message
    assert "max_num_seqs" in message and "state_size to" in message
    assert "max_num_seqs='auto'" in message
    # (64 slots + 4 prefix-cache rows) x (K/V + scratch + positions) in float64
    assert "24.0 GiB" in message and "4 prefix-cache rows" in message
    fewer = int(message.split("max_num_seqs to ")[1].split()[0])
    # The advice is exact: that many slots fit, one more does not.
    assert needed(BIG, SMOLLM2, fewer) <= free < needed(BIG, SMOLLM2, fewer + 1)
    check_fits(BIG.replace(max_num_seqs=fewer), SMOLLM2, DeviceMemory(free, free))


def test_when_not_even_one_slot_fits_only_state_size_is_advised():
    free = needed(BIG, SMOLLM2, 1) - 1
    assert needed(BIG.replace(state_size=1), SMOLLM2, 64) <= free  # the scenario holds
    with pytest.raises(ValueError) as info:
        resolve_config(BIG, SMOLLM2, weight_bytes=0, memory=DeviceMemory(free, free))
    message = str(info.value)
    assert "lower state_size to" in message and "max_num_seqs to" not in message
    smaller = int(message.split("state_size to ")[1].split(",")[0])
    check_fits(BIG.replace(state_size=smaller), SMOLLM2, DeviceMemory(free, free))
    with pytest.raises(ValueError):
        check_fits(BIG.replace(state_size=smaller + 1), SMOLLM2, DeviceMemory(free, free))


def test_when_activations_alone_do_not_fit_no_number_is_advised():
    free = activation_bytes(BIG, SMOLLM2, 64) // 2
    with pytest.raises(ValueError, match=r"lower state_size, or use max_num_seqs='auto'"):
        resolve_config(BIG, SMOLLM2, weight_bytes=0, memory=DeviceMemory(free, free))


def test_a_state_that_fits_passes_unchanged():
    config = EngineConfig(state_size=256, device="cpu")
    free = 4 * GiB
    assert resolve_config(config, SMOLLM2, 10**9, DeviceMemory(free, free)) is config


def test_activations_are_reserved():
    config = EngineConfig(state_size=16, max_num_seqs=4, device="cpu")
    state = state_footprint(config, TINY).bytes_for(4)
    with pytest.raises(ValueError, match="for activations"):
        check_fits(config, TINY, DeviceMemory(state + 1, state + 1))
    assert activation_bytes(config, TINY, 4) >= memory.FIXED_RESERVE["cpu"]


# ----- the default prefix cache on one GPU -----------------------------------------------------


def test_the_default_prefix_cache_takes_what_the_slots_leave():
    """64 explicit slots of SmolLM2 at S=512 (float64) beside 1 GiB of weights on a 40 GiB
    device: the cache takes every row memory_utilization leaves, and the whole still fits."""
    config = EngineConfig(state_size=512, max_num_seqs=64, dtype="float64", device="cpu")
    weights, total = GiB, 40 * GiB
    mem = DeviceMemory(total - weights, total)
    resolved = resolve_config(config, SMOLLM2, weights, mem, fill_prefix_cache=True)
    footprint = state_footprint(resolved, SMOLLM2)
    rows = footprint.cache_rows(64)
    assert rows > 64 // 16 and resolved.prefix_cache_bytes == rows * footprint.slot_bytes
    budget = int(0.9 * total) - weights
    used = footprint.bytes_for(64) + activation_bytes(resolved, SMOLLM2, 64)
    assert used <= budget < used + footprint.slot_bytes  # one row more would not fit
    check_fits(resolved, SMOLLM2, mem)
    # Left as it was: asked for explicitly, not filling (CPU, tensor parallelism), or no room.
    explicit = config.replace(prefix_cache_bytes=0)
    assert resolve_config(explicit, SMOLLM2, weights, mem, fill_prefix_cache=True) is explicit
    assert resolve_config(config, SMOLLM2, weights, mem) is config
    tight = DeviceMemory(needed(config, SMOLLM2, 64), needed(config, SMOLLM2, 64))
    assert resolve_config(config, SMOLLM2, 0, tight, fill_prefix_cache=True) is config


def test_the_filled_prefix_cache_is_capped():
    config = EngineConfig(state_size=16, max_num_seqs=4, device="cpu")
    mem = DeviceMemory(100 * GiB, 100 * GiB)
    resolved = resolve_config(config, TINY, 0, mem, fill_prefix_cache=True)
    assert state_footprint(resolved, TINY).cache_rows(4) == memory.MAX_CACHE_ROWS


# ----- max_num_seqs="auto" ------------------------------------------------------------------


def auto(config: EngineConfig, model_config: ModelConfig, weights: int, free: int, total: int):
    return resolve_config(config, model_config, weights, DeviceMemory(free, total)).max_num_seqs


def test_auto_takes_as_many_slots_as_the_memory_fraction_allows():
    config = BIG.replace(max_num_seqs="auto")
    weights, free = 2 * GiB, 10 * GiB
    total = free + weights  # CPU: the RAM that was available before the weights were loaded
    slots = auto(config, SMOLLM2, weights, free, total)
    budget = int(0.9 * total) - weights  # < free: the fraction is what binds
    assert needed(config, SMOLLM2, slots) <= budget < needed(config, SMOLLM2, slots + 1)
    # 0.9 * 12 - 2 = 8.8 GiB, less 1.8 GiB of activations: 7.0 GiB / 361 MiB a row = 19.9
    # rows: 18 slots and the prefix cache's 1 (1/16 of the slots)
    assert slots == 18


def test_auto_never_takes_more_than_is_free():
    config = BIG.replace(max_num_seqs="auto", memory_utilization=1.0)
    free = 4 * GiB
    slots = auto(config, SMOLLM2, 0, free, total=100 * GiB)
    assert needed(config, SMOLLM2, slots) <= free < needed(config, SMOLLM2, slots + 1)


def test_auto_scales_with_memory_utilization_and_weights():
    config = BIG.replace(max_num_seqs="auto")
    base = auto(config, SMOLLM2, GiB, 20 * GiB, 21 * GiB)
    assert auto(config.replace(memory_utilization=0.5), SMOLLM2, GiB, 20 * GiB, 21 * GiB) < base
    assert auto(config, SMOLLM2, 5 * GiB, 20 * GiB, 25 * GiB) < base + 1


def test_auto_is_capped():
    config = EngineConfig(state_size=16, max_num_seqs="auto", device="cpu")
    assert auto(config, TINY, 0, 100 * GiB, 100 * GiB) == AUTO_MAX_NUM_SEQS
    budget = config.replace(max_num_batched_tokens=300)
    resolved = resolve_config(budget, TINY, 0, DeviceMemory(100 * GiB, 100 * GiB))
    assert resolved.max_num_seqs == 300 and resolved.batched_token_budget == 300


def test_auto_resolution_makes_the_int_only_properties_usable():
    config = EngineConfig(state_size=16, max_num_seqs="auto", device="cpu")
    with pytest.raises(ValueError, match="resolve"):
        _ = config.batched_token_budget
    with pytest.raises(ValueError, match="resolve"):
        _ = config.graph_batch_sizes
    resolved = resolve_config(config, TINY, 0, DeviceMemory(GiB, GiB))
    assert isinstance(resolved.max_num_seqs, int) and resolved.max_num_seqs >= 1
    assert resolved.graph_batch_sizes[-1] == resolved.max_num_seqs
    assert resolved.batched_token_budget >= resolved.max_num_seqs


def test_auto_with_no_room_for_one_slot_says_so():
    config = BIG.replace(max_num_seqs="auto")
    with pytest.raises(ValueError) as info:
        auto(config, SMOLLM2, GiB, int(2.5 * GiB), int(2.5 * GiB))
    message = str(info.value)
    assert "not even one slot of state_size 4096" in message
    assert "memory_utilization" in message and "state_size to" in message


def test_auto_logs_its_choice(caplog):
    config = EngineConfig(state_size=16, max_num_seqs="auto", device="cpu")
    with caplog.at_level("INFO", logger="tova_engine"):
        slots = auto(config, TINY, 0, GiB, GiB)
    assert f"max_num_seqs auto: {slots} slots of state_size 16" in caplog.text


# ----- EngineConfig -------------------------------------------------------------------------


def test_config_accepts_auto():
    config = EngineConfig(max_num_seqs="auto", cuda_graph_batch_sizes=(1, 512))
    assert config.max_num_seqs == "auto"
    assert EngineConfig(max_num_seqs="auto", max_num_batched_tokens=8).max_num_seqs == "auto"


@pytest.mark.parametrize("value", ["many", "Auto", 0, -1, 2.0, True, None])
def test_config_rejects_other_max_num_seqs(value):
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1 or 'auto'"):
        EngineConfig(max_num_seqs=value)


def test_graph_sizes_are_still_bounded_by_an_int_max_num_seqs():
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
        EngineConfig(max_num_seqs=4, cuda_graph_batch_sizes=(8,))


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 0.01])
def test_memory_utilization_accepts_fractions(value):
    assert EngineConfig(memory_utilization=value).memory_utilization == value


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2, math.nan, math.inf, True, "0.5", None])
def test_memory_utilization_rejects_the_rest(value):
    with pytest.raises(ValueError, match=r"memory_utilization must be a number in \(0, 1\]"):
        EngineConfig(memory_utilization=value)


# ----- measuring memory ---------------------------------------------------------------------


def test_weight_bytes_counts_a_tied_weight_once():
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    model = LlamaModel.empty(tied, torch.device("cpu"), torch.float32)
    unique = {id(p): p for p in model.parameters()}
    expected = sum(p.numel() * 4 for p in unique.values()) + model.inv_freq.numel() * 4
    assert memory.weight_bytes(model) == expected
    untied = LlamaModel.empty(TINY, torch.device("cpu"), torch.float32)
    assert memory.weight_bytes(untied) == expected + 96 * 64 * 4  # its own lm_head


def test_cpu_memory_is_available_ram_and_total_includes_the_weights(monkeypatch):
    monkeypatch.setattr(memory, "available_ram", lambda: 5 * GiB)
    assert memory.device_memory(torch.device("cpu"), GiB) == DeviceMemory(5 * GiB, 6 * GiB)


def test_meminfo_is_read_in_bytes(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 24684084 kB\nMemAvailable: 21957208 kB\nHugePages_Total: 0\n")
    fields = memory._meminfo(path)
    assert fields["MemAvailable"] == 21957208 * 1024 and fields["HugePages_Total"] == 0
    assert memory._meminfo(tmp_path / "missing") == {}


def test_available_ram_is_positive():
    assert memory.available_ram() > 0


@pytest.mark.parametrize(
    ("files", "headroom"),
    [
        # cgroup v2: limit 8 GiB, 3 GiB used of which 1 GiB reclaimable page cache.
        (
            {"memory.max": str(8 * GiB), "memory.current": str(3 * GiB),
             "memory.stat": f"anon 123\ninactive_file {GiB}\n"},
            6 * GiB,
        ),
        ({"memory.max": "max", "memory.current": "1", "memory.stat": ""}, None),
        # cgroup v1
        (
            {"memory/memory.limit_in_bytes": str(4 * GiB),
             "memory/memory.usage_in_bytes": str(GiB),
             "memory/memory.stat": "total_inactive_file 0\n"},
            3 * GiB,
        ),
        ({"memory/memory.limit_in_bytes": "9223372036854771712",
          "memory/memory.usage_in_bytes": "1", "memory/memory.stat": ""}, None),
        ({}, None),
    ],
)
def test_cgroup_headroom(tmp_path, files, headroom):
    write_files(tmp_path / "sys/fs/cgroup", files)
    assert memory._cgroup_headroom(tmp_path) == headroom
