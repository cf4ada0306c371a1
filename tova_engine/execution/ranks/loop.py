"""What ranks 1..N-1 run: each its shard of the model and of the state, stepping by rank 0's
plans (`plan.py`), which come over its link (`links.py`), until told to stop or until rank 0
is gone."""

from __future__ import annotations

import contextlib
import logging
import os
from multiprocessing.connection import Connection

from tova_engine.config import EngineConfig
from tova_engine.execution.ranks import faults
from tova_engine.execution.ranks.links import Link
from tova_engine.execution.ranks.plan import GATHER_RETAINED, STOP, Mirror, SaveSlot, StepPlan
from tova_engine.execution.ranks.start import Failed, Joining, Ready
from tova_engine.execution.worker import Worker, build_worker, capture_graphs, release_graphs
from tova_engine.parallel.group import join_group, leave_group

logger = logging.getLogger("tova_engine")


def run_rank(config: EngineConfig, rank: int, size: int, init_method: str,
             connection: Connection, log_level: int) -> None:
    """The entry point of rank `rank` (a spawned process). config: rank 0's, resolved."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] "
                                                 "%(name)s: %(message)s")
    link = Link(connection, rank)
    try:
        worker = _start(config, rank, size, init_method, link)
    except BaseException as exc:  # rank 0 raises it, naming this rank
        logger.exception("tensor-parallel rank %d failed while starting", rank)
        with contextlib.suppress(OSError):  # unless rank 0 is gone already
            link.send(Failed.of(exc))
        os._exit(1)
    capture_graphs(worker)
    try:
        _serve(worker, link)
    except EOFError:  # rank 0's process is gone: nobody will send another plan
        logger.error("tensor-parallel rank %d: rank 0 is gone; exiting", rank)
        os._exit(1)
    except Exception:  # rank 0 is gone (its collectives fail), or this rank broke
        logger.exception("tensor-parallel rank %d stopped", rank)
        os._exit(1)
    release_graphs(worker)
    leave_group()
    logging.shutdown()
    os._exit(0)  # no destructors left to wait on a peer


def _start(config: EngineConfig, rank: int, size: int, init_method: str, link: Link) -> Worker:
    faults.plant(rank, "start")
    if config.torch_device.type == "cuda":
        config = config.replace(device=f"cuda:{rank}")
    link.send(Joining())
    faults.plant(rank, "join")
    tp = join_group(config.torch_device, rank, size, init_method,
                    config.distributed_timeout_seconds)
    faults.plant(rank, "load")
    worker = build_worker(config, tp)  # built as rank 0 built its own
    link.send(Ready())
    return worker


def _serve(worker: Worker, link: Link) -> None:
    """Rank 0's messages, in order, until STOP."""
    mirror = Mirror()
    runner = worker.runner
    while (message := link.receive()) != STOP:
        if isinstance(message, StepPlan):
            runner.collect(runner.launch(mirror.apply(message)))
        elif message == GATHER_RETAINED:
            worker.retained_by_rank()
        elif isinstance(message, SaveSlot):
            link.send(worker.state.snapshot(message.slot, message.spec, []))
        else:
            raise TypeError(f"unexpected message from rank 0: {type(message).__name__}")

