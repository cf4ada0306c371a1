"""Start the other ranks of a tensor-parallel engine, join them to rank 0, stop them."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import tempfile
import threading
import uuid

from tova_engine.config import EngineConfig
from tova_engine.execution.ranks.links import Link, Links
from tova_engine.execution.ranks.loop import run_rank
from tova_engine.execution.ranks.plan import STOP, StepPlan, for_rank, resumes
from tova_engine.execution.ranks.start import (
    Joining,
    RankStartError,
    Ready,
    raise_if_failed,
    wait_for,
)
from tova_engine.parallel.group import TensorParallel, join_group, leave_group

logger = logging.getLogger("tova_engine")


class Ranks:
    """Ranks 1..N-1, each in its own process (spawned: CUDA and threads need a fresh one) with
    a link to this one, and this process joined to them as rank 0. Raises RankStartError
    (`start.py`) as soon as a rank fails to start, having stopped the others."""

    def __init__(self, config: EngineConfig, size: int) -> None:
        """config: rank 0's, resolved: every rank builds the same engine from it."""
        self.size = size
        self._path = os.path.join(tempfile.gettempdir(), f"tova-tp-{uuid.uuid4().hex[:12]}")
        init_method = f"file://{self._path}"
        context = multiprocessing.get_context("spawn")
        ours, theirs = zip(*(context.Pipe(duplex=True) for _ in range(1, size)), strict=True)
        self.processes = [
            context.Process(
                target=run_rank,
                args=(config, rank, size, init_method, end, logging.getLogger().level),
                name=f"tova-tp-rank-{rank}",
                daemon=True,
            )
            for rank, end in zip(range(1, size), theirs, strict=True)
        ]
        self.links = Links([Link(end, rank) for rank, end in zip(range(1, size), ours,
                                                                  strict=True)])
        self._stopped = False
        self.tp: TensorParallel | None = None
        timeout_s = config.distributed_timeout_seconds
        try:
            for process in self.processes:
                process.start()
            for end in theirs:  # the ranks hold them now: a rank's end closes when it dies
                end.close()
            logger.info("tensor parallelism: started ranks 1-%d, joining them", size - 1)
            links = self.links.links
            wait_for(Joining, links, self.processes, "starting", timeout_s)
            self.tp = self._join(config, init_method, timeout_s)
            wait_for(Ready, links, self.processes, "loading its shard")
        except BaseException:
            self._abandon()
            raise

    def _join(self, config: EngineConfig, init_method: str, timeout_s: float) -> TensorParallel:
        try:
            return join_group(config.torch_device, 0, self.size, init_method, timeout_s)
        except Exception as exc:  # a rank's own error, if one failed meanwhile, says more
            raise_if_failed(self.links.links, self.processes, "joining the group")
            raise RankStartError(
                f"the tensor-parallel group did not form within {timeout_s:g} s "
                f"(distributed_timeout_seconds): {type(exc).__name__}: {exc}"
            ) from exc

    def send(self, what: object) -> None:
        """What ranks 1..N-1 run next: a step's plan or a command (`plan.py`). Raises RankGone
        if a rank's process has ended."""
        if isinstance(what, StepPlan) and resumes(what):
            self.links.send_each([for_rank(what, rank, self.size) for rank in range(1, self.size)])
        else:
            self.links.send(what)

    def receive_all(self) -> list[object]:
        """Each rank's answer to the command just sent, rank order."""
        return self.links.receive_all()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.links.send(STOP)
        except RuntimeError:  # a rank is already gone: the others exit on their own error
            logger.warning("tensor parallelism: could not tell every rank to stop")
        # Every rank leaves at once; bounded, so that closing never hangs on a stuck peer.
        leaving = threading.Thread(target=leave_group, name="tova-tp-leave", daemon=True)
        leaving.start()
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
        leaving.join(timeout_s)
        if leaving.is_alive():
            logger.error("tensor parallelism: the process group did not shut down in %.0f s; "
                         "this process cannot start another tensor-parallel engine", timeout_s)
        self._clean_up()

    def _abandon(self) -> None:
        """A start that failed: the ranks left are of no use (and may wait in the group for a
        peer that will never come), so they are killed, not asked."""
        self._stopped = True
        for process in self.processes:
            if process.is_alive():
                process.kill()
            if process.pid is not None:
                process.join(5)
        if self.tp is not None:
            leave_group()
        self._clean_up()

    def _clean_up(self) -> None:
        self.links.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
