"""Start the other ranks of a tensor-parallel engine, join them to rank 0, stop them."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import tempfile
import threading
import uuid

from tova_engine.config import EngineConfig
from tova_engine.execution.ranks.loop import run_rank
from tova_engine.execution.ranks.plan import STOP
from tova_engine.parallel.group import TensorParallel, join_group, leave_group

logger = logging.getLogger("tova_engine")


class Ranks:
    """Ranks 1..N-1, each in its own process (spawned: CUDA and threads need a fresh one),
    and this process joined to them as rank 0."""

    def __init__(self, config: EngineConfig, size: int) -> None:
        """config: rank 0's, resolved: every rank builds the same engine from it."""
        path = os.path.join(tempfile.gettempdir(), f"tova-tp-{uuid.uuid4().hex[:12]}")
        init_method = f"file://{path}"
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(
                target=run_rank,
                args=(config, rank, size, init_method, logging.getLogger().level),
                name=f"tova-tp-rank-{rank}",
                daemon=True,
            )
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        logger.info("tensor parallelism: started ranks 1-%d, joining them", size - 1)
        self.tp: TensorParallel = join_group(config.torch_device, 0, size, init_method)
        self._path = path
        self._stopped = False
        atexit.register(self.stop)

    def send(self, what: object) -> None:
        """What ranks 1..N-1 run next: a step's plan or a command (`plan.py`)."""
        self.tp.broadcast_object(what)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.send(STOP)
        except Exception:  # a rank is already gone: the others exit on their own error
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
        if os.path.exists(self._path):
            os.unlink(self._path)
