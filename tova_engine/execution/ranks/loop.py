"""What ranks 1..N-1 run: each its shard of the model and of the state, stepping by rank 0's
plans (`plan.py`) until told to stop."""

from __future__ import annotations

import logging
import os

from tova_engine.config import EngineConfig
from tova_engine.execution.ranks.plan import GATHER_RETAINED, STOP, Mirror
from tova_engine.execution.worker import build_worker, capture_graphs, release_graphs
from tova_engine.parallel.group import join_group, leave_group

logger = logging.getLogger("tova_engine")


def run_rank(config: EngineConfig, rank: int, size: int, init_method: str, log_level: int) -> None:
    """The entry point of rank `rank` (a spawned process). config: rank 0's, resolved."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] "
                                                 "%(name)s: %(message)s")
    if config.torch_device.type == "cuda":
        config = config.replace(device=f"cuda:{rank}")
    tp = join_group(config.torch_device, rank, size, init_method)
    worker = build_worker(config, tp)  # built as rank 0 built its own
    capture_graphs(worker)
    mirror = Mirror()
    try:
        while (plan := tp.broadcast_object()) != STOP:
            if plan == GATHER_RETAINED:
                worker.retained_by_rank()
                continue
            runner = worker.runner
            runner.collect(runner.launch(mirror.apply(plan)))
    except Exception:  # rank 0 is gone (its collectives fail), or this rank broke
        logger.exception("tensor-parallel rank %d stopped", rank)
        os._exit(1)
    release_graphs(worker)
    leave_group()
    logging.shutdown()
    os._exit(0)  # no destructors left to wait on a peer
