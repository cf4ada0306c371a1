"""Ranks 1..N-1 of a tensor-parallel engine: the model's and the state's other shards.

Rank 0 (the `EngineCore`) schedules; before it launches a step it broadcasts the step's plan
(`StepPlan`: requests admitted with their slots, the choices that decode, the prefill chunks,
the requests that left). Every other rank keeps mirror `Request`s, rebuilds the same
`SchedulerOutput` from the plan and runs the same `ModelRunner.launch`: the same kernels and
collectives in the same order, on its own heads. Rank 0 samples; the runner broadcasts the
tokens, so every rank feeds the same ones next step.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tova_engine.messages import CoreRequest
from tova_engine.parallel.group import TensorParallel, leave_group, release_graphs
from tova_engine.request import Request, Sequence
from tova_engine.scheduler import PrefillChunk, SchedulerOutput

logger = logging.getLogger("tova_engine")
STOP = "stop"
# Instead of a plan: every rank sends rank 0 its retained positions (`gather_retained`).
GATHER_RETAINED = "gather-retained"
# A collective that waits longer than this means a rank is gone: fail instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=600)


@dataclass(slots=True)
class AdmittedRequest:
    request: CoreRequest
    slots: list[int]


@dataclass(slots=True)
class StepPlan:
    admitted: list[AdmittedRequest] = field(default_factory=list)
    decodes: list[tuple[str, int]] = field(default_factory=list)  # (request id, choice)
    prefills: list[tuple[str, int, int]] = field(default_factory=list)  # (id, start, length)
    retired: list[str] = field(default_factory=list)  # requests gone since the last plan


def plan_of(scheduled: SchedulerOutput, core_requests: dict[str, CoreRequest],
            retired: list[str]) -> StepPlan:
    """What the other ranks need to run `scheduled` exactly as rank 0 will."""
    return StepPlan(
        admitted=[
            AdmittedRequest(core_requests[r.request_id], [seq.slot for seq in r.sequences])
            for r in scheduled.admitted
        ],
        decodes=[(seq.request.request_id, seq.index) for seq in scheduled.decodes],
        prefills=[(c.request.request_id, c.start, c.length) for c in scheduled.prefills],
        retired=list(retired),
    )


class Mirror:
    """A worker's copies of the running requests: token ids, params and slots, no outputs."""

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}

    def apply(self, plan: StepPlan) -> SchedulerOutput:
        for request_id in plan.retired:
            self.requests.pop(request_id, None)
        admitted = []
        for entry in plan.admitted:
            request = Request.of(entry.request, [None] * len(entry.slots))
            for seq, slot in zip(request.sequences, entry.slots, strict=True):
                seq.slot = slot
            self.requests[request.request_id] = request
            admitted.append(request)
        decodes: list[Sequence] = [self.requests[rid].sequences[i] for rid, i in plan.decodes]
        prefills = [
            PrefillChunk(self.requests[rid], start, length) for rid, start, length in plan.prefills
        ]
        return SchedulerOutput(admitted, decodes, prefills)


def gather_retained(state, tp: TensorParallel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's (positions [layers, rows, S+1], num_entries [rows]) on the host, rank
    order: ranks that evicted alike hold the same. Between steps only (tests, debugging)."""
    positions = tp.all_gather(state.positions)
    entries = tp.all_gather(state.num_entries)
    return [(p.cpu(), n.cpu()) for p, n in zip(positions, entries, strict=True)]


def init_group(config, rank: int, size: int, init_method: str) -> TensorParallel:
    device = config.torch_device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    return TensorParallel(rank, size)


def run_worker(config, rank: int, size: int, init_method: str, log_level: int) -> None:
    """The entry point of rank `rank` (a spawned process)."""
    from tova_engine.executor import build_executor, capture_graphs  # the same as rank 0's

    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] "
                                                 "%(name)s: %(message)s")
    if config.torch_device.type == "cuda":
        config = config.replace(device=f"cuda:{rank}")
    tp = init_group(config, rank, size, init_method)
    executor = build_executor(config, tp)
    capture_graphs(executor)
    mirror = Mirror()
    try:
        while (plan := tp.broadcast_object()) != STOP:
            if plan == GATHER_RETAINED:
                gather_retained(executor.state, tp)
                continue
            runner = executor.runner
            runner.collect(runner.launch(mirror.apply(plan)))
    except Exception:  # rank 0 is gone (its collectives fail), or this rank broke
        logger.exception("tensor-parallel rank %d stopped", rank)
        os._exit(1)
    release_graphs(executor.runner)
    leave_group()
    logging.shutdown()
    os._exit(0)  # no destructors left to wait on a peer
