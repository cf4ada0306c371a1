"""How many threads torch's CPU operators use in the engine core, chosen once at start-up.

torch defaults to one intra-op thread per physical core of the machine. When another
process keeps a core busy (the server's front end, a test runner, a neighbour), each
operator waits for its slowest thread. Measured on a 2-core VM whose cores other processes
kept 55-80% busy, SmolLM2 (state_size 256) took 2.8-3.2 s per 32 tokens with 1 thread and
18-27 s with 2; with a busy loop added, 5.8 s against 23-28 s. So the engine leaves one
core to the rest of the system.

Precedence, first that applies:
1. `TOVA_CPU_THREADS=N` in the environment: N threads.
2. `OMP_NUM_THREADS` or `MKL_NUM_THREADS` in the environment: torch has applied it; kept.
3. `torch.set_num_threads(N)` called before the engine started (the count differs from
   torch's default): kept.
4. Otherwise one thread per usable physical core less one, at least one. Usable: the cores
   this process may run on (CPU affinity, the cgroup's CPU quota).
On CUDA only `TOVA_CPU_THREADS` changes the count: the step's arithmetic runs on the GPU
and its host side (small index tensors, pinned copies) is too small to use threads.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger("tova_engine")

ENV_VAR = "TOVA_CPU_THREADS"
_USER_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# The count this module set last, so that a second engine in the process does not take
# its own earlier choice for the user's.
_chosen: int | None = None


class ThreadChoice(NamedTuple):
    threads: int
    reason: str


def configure_cpu_threads(device: torch.device) -> int:
    """Set torch's intra-op thread count for the engine on `device`; returns the count in
    effect. Logs the choice once per process (again only if it changes)."""
    global _chosen
    current = torch.get_num_threads()
    if device.type != "cpu" and not os.environ.get(ENV_VAR, "").strip():
        return current
    if _chosen is not None and current == _chosen:
        return current
    choice = choose_cpu_threads(os.environ, current, torch_default_threads(), usable_cores())
    if choice.threads != current:
        torch.set_num_threads(choice.threads)
    _chosen = choice.threads
    logger.info("CPU threads: %d (%s)", choice.threads, choice.reason)
    return choice.threads


def choose_cpu_threads(
    env: Mapping[str, str], current: int, torch_default: int, cores: int
) -> ThreadChoice:
    """The precedence above, without side effects: env is the environment, current is
    torch.get_num_threads(), torch_default what torch starts with, cores the usable ones."""
    if (value := env.get(ENV_VAR, "").strip()) != "":
        return ThreadChoice(_positive_int(value), f"{ENV_VAR}={value}")
    for name in _USER_ENV_VARS:
        if env.get(name, "").strip():
            return ThreadChoice(current, f"{name}={env[name].strip()} as torch applied it")
    if current != torch_default:
        return ThreadChoice(current, "set by torch.set_num_threads before the engine started")
    threads = max(1, cores - 1)
    return ThreadChoice(threads, f"{cores} usable cores less one for the front end and the system")


def _positive_int(value: str) -> int:
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{ENV_VAR} must be an integer >= 1; got {value!r}")
    return threads


def torch_default_threads() -> int:
    """What torch chose at start-up without a setting: the machine's physical cores."""
    return _physical_cores() or os.cpu_count() or 1


def usable_cores() -> int:
    """Physical cores this process may run on: its CPU affinity (SMT siblings count as
    one core), capped by the cgroup's CPU quota (a container's --cpus)."""
    logical = os.cpu_count() or 1
    physical = _physical_cores() or logical
    cores = max(1, _allowed() * physical // logical)
    quota = _cgroup_cpu_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity), capped by the cgroup's quota:
    how many processes can run at once here."""
    quota = _cgroup_cpu_quota()
    return _allowed() if quota is None else max(1, min(_allowed(), math.ceil(quota)))


def _allowed() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _physical_cores(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or None


def _cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 cpu.max, v1 cfs quota/period)."""
    try:
        quota, period = (root / "sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        folder = root / "sys/fs/cgroup/cpu"
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period
