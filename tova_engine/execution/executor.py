"""The engine core's one view of execution: an `Executor` runs the steps the scheduler plans,
on one device or over a tensor-parallel group, and answers the few reads the core needs (what
was built, a slot's state). `make_executor` builds the one the configuration asks for."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from tova_engine.config import DEFAULT_TARGET_ITL_MS, EngineConfig
from tova_engine.execution.lifetime import close_with
from tova_engine.execution.ranks.launch import Ranks
from tova_engine.execution.ranks.plan import GATHER_RETAINED, SaveSlot, plan_of
from tova_engine.execution.runner import InFlight, StepResult
from tova_engine.execution.state_shards import join_heads
from tova_engine.execution.worker import (
    Worker,
    build_worker,
    capture_graphs,
    on_device,
    release_graphs,
)
from tova_engine.model.config import ModelConfig
from tova_engine.parallel import SINGLE, TensorParallel
from tova_engine.parallel.group import check_free
from tova_engine.state.policies import Policy

if TYPE_CHECKING:
    from tova_engine.state.snapshots import SnapshotSpec, StateSnapshot
    from tova_engine.step.batch import SchedulerOutput


def resolve_device(config: EngineConfig, tp: TensorParallel = SINGLE) -> EngineConfig:
    """`config` with what depends on the device resolved: async_scheduling on with CUDA; the
    prefill pacing's target DEFAULT_TARGET_ITL_MS with CUDA and off on CPU (where one prompt
    chunk alone outlasts a few decode steps, so pacing would only hold prompts back); and the
    GPU named by index (rank r of a tensor-parallel group on cuda:r, one engine on "cuda" on
    the device current now). Every later use (the step's device context, generators, the
    start-up log) then means the device the state was built on, whatever another engine in
    the process makes current meanwhile."""
    device = config.torch_device
    if config.async_scheduling is None:
        config = config.replace(async_scheduling=device.type == "cuda")
    if config.target_itl_ms is None:
        target = DEFAULT_TARGET_ITL_MS if device.type == "cuda" else 0
        config = config.replace(target_itl_ms=target)
    if device.type != "cuda" or device.index is not None:
        return config
    return config.replace(device=f"cuda:{tp.rank if tp.enabled else torch.cuda.current_device()}")


class StepInFlight(NamedTuple):
    """A launched step: the runner's handle, or why launching it failed (`collect` raises it)."""

    flight: InFlight | None
    error: Exception | None


class Executor(ABC):
    """Runs the core's scheduled steps; the core sees nothing else of execution. Two
    implementations: `OneDeviceExecutor` (this process's device) and `TensorParallelExecutor`
    (this process is rank 0 of a group: it starts ranks 1..N-1, sends them each step's plan
    before it runs the step on its own shard, and stops them).

    The contract:
    - `launch(scheduled)` queues a non-empty step's work on every rank and returns before the
      device is done; `collect(step)` waits for that step and returns its results as host
      lists. Steps are collected in the order they were launched; the next one may be
      launched before the last is collected (async scheduling).
    - A failed step fails alone: `collect` raises its error, whether it failed when launched
      or later, and the next step runs. `launch` raises only when the executor itself is
      broken (a rank is gone): the core cannot go on.
    - `retained_positions` reads a slot of this process's state, `snapshot` the slot's whole
      state (every rank's heads), while no step that writes it is in flight;
      `retained_by_rank` reads every rank's with no step in flight.
    - What the build resolved (`config`, `model_config`, `model_name`, `tokenizer`,
      `max_model_len`, `policy`, `eos_token_ids`) never changes.
    - `close()` lets go of what the executor started; closing again does nothing. An
      executor collected or left open at interpreter exit is closed then.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker  # this process's device: the one device, or rank 0's shard

    @abstractmethod
    def launch(self, scheduled: SchedulerOutput) -> StepInFlight: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def retained_by_rank(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each rank's (positions [layers, rows, S+1], num_entries [rows]) of its state on
        the host, rank order (one entry on one device): ranks that evicted alike hold the
        same."""

    def collect(self, step: StepInFlight) -> StepResult:
        if step.error is not None:
            raise step.error
        return self.worker.runner.collect(step.flight)

    def _launch_here(self, scheduled: SchedulerOutput) -> StepInFlight:
        """The step launched on this process's device."""
        try:
            return StepInFlight(self.worker.runner.launch(scheduled), None)
        except Exception as exc:  # failed when launched: fails when collected
            return StepInFlight(None, exc)

    # ----- what the build resolved ----------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        """The configuration as built: device by index, async_scheduling and max_num_seqs
        resolved."""
        return self.worker.config

    @property
    def model_config(self) -> ModelConfig:
        """The whole model's (not a rank's shard)."""
        return self.worker.model_config

    @property
    def model_name(self) -> str:
        return self.worker.model_name

    @property
    def quantization(self) -> str | None:
        return self.worker.quantization

    @property
    def tokenizer(self) -> Any:
        return self.worker.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.worker.max_model_len

    @property
    def policy(self) -> Policy:
        return self.worker.policy

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.worker.eos_token_ids

    def on_device(self) -> AbstractContextManager:
        """This executor's device current in the context (the core's steps run in it)."""
        return on_device(self.config.torch_device)

    # ----- the state ----------------------------------------------------------------------

    def state_total_bytes(self) -> int:
        """The state's memory on this process's device (rank 0's share under tensor
        parallelism)."""
        return self.worker.state.total_bytes()

    def prefix_cache_rows(self) -> range:
        """The state rows set aside for cached prefix states (the same on every rank)."""
        return self.worker.state.cache_rows

    def state_row_bytes(self) -> int:
        """One state row's bytes on this process's device (a slot, or a cached prefix)."""
        return self.worker.state.row_bytes()

    def retained_positions(self, slot: int) -> list[list[int]]:
        """Per layer, the sorted absolute positions the slot's state holds."""
        return self.worker.state.retained_positions(slot)

    def snapshot(self, slot: int, spec: SnapshotSpec, pending_token_ids: list[int]
                 ) -> StateSnapshot:
        """A host copy of the slot's state, every key/value head of the model: it continues
        under any tensor-parallel size."""
        return self.worker.state.snapshot(slot, spec, pending_token_ids)


class OneDeviceExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        worker = build_worker(resolve_device(config), SINGLE)
        capture_graphs(worker)
        super().__init__(worker)

    def launch(self, scheduled: SchedulerOutput) -> StepInFlight:
        return self._launch_here(scheduled)

    def close(self) -> None:
        """Nothing was started beside this process."""

    def retained_by_rank(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.worker.retained_by_rank()


class TensorParallelExecutor(Executor):
    """Rank 0 of `tensor_parallel_size` processes, one per device: it builds its own shard,
    then starts the other ranks with the configuration it resolved. A rank that fails to
    start fails the build at once (RankStartError, `ranks/start.py`)."""

    def __init__(self, config: EngineConfig) -> None:
        check_free()  # before any weight is read
        tp = TensorParallel(0, config.tensor_parallel_size)
        worker = build_worker(resolve_device(config, tp), tp)
        self.ranks = Ranks(worker.config, tp.size)
        try:
            capture_graphs(worker)  # captured collectives: once every rank has joined
        except BaseException:  # the ranks wait in the group: let them go, or none can form
            self.ranks.stop()
            raise
        super().__init__(worker)
        # The group is the process's only one: let it go when this executor goes, so that
        # another engine can form its own.
        self._close = close_with(self, _close_group, worker, self.ranks)

    def launch(self, scheduled: SchedulerOutput) -> StepInFlight:
        self.ranks.send(plan_of(scheduled))  # the other ranks run the same step on their shards
        return self._launch_here(scheduled)

    def close(self) -> None:
        self._close()

    def retained_by_rank(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.ranks.send(GATHER_RETAINED)
        return self.worker.retained_by_rank()

    def snapshot(self, slot: int, spec: SnapshotSpec, pending_token_ids: list[int]
                 ) -> StateSnapshot:
        """Rank 0 gathers: each rank sends its heads of the slot, joined in rank order."""
        self.ranks.send(SaveSlot(slot, spec))
        own = super().snapshot(slot, spec, pending_token_ids)
        return join_heads([own, *self.ranks.receive_all()])


def _close_group(worker: Worker, ranks: Ranks) -> None:
    release_graphs(worker)
    ranks.stop()


def make_executor(config: EngineConfig) -> Executor:
    """The executor `config` asks for, built, its graphs captured."""
    if config.tensor_parallel_size > 1:
        return TensorParallelExecutor(config)
    return OneDeviceExecutor(config)
