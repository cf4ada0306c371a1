"""What rank 0 tells the other ranks before each step, and how they rebuild the step from it.

Rank 0 schedules; before it launches a step it broadcasts the step's plan (`StepPlan`:
requests admitted with their slots, the choices that decode, the prefill chunks, the requests
that left). Every other rank keeps mirror `Request`s, rebuilds the same `SchedulerOutput`
from the plan and runs the same `ModelRunner.launch`: the same kernels and collectives in the
same order, on its own heads. Rank 0 samples; the runner broadcasts the tokens, so every rank
feeds the same ones next step. A plan is constant in size per request whatever its length:
the prompt travels once, at admission, and so does a continued conversation's saved state:
each rank gets its own block of its heads (`execution/state_shards.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tova_engine.execution.state_shards import rank_heads
from tova_engine.state.snapshots import SnapshotSpec, StateSnapshot
from tova_engine.step.batch import PrefillChunk, SchedulerOutput
from tova_engine.step.request import CoreRequest, Request, Sequence

# Instead of a plan: the ranks leave the loop.
STOP = "stop"
# Instead of a plan: every rank sends rank 0 its retained positions (`Worker.retained_by_rank`).
GATHER_RETAINED = "gather-retained"


@dataclass(frozen=True, slots=True)
class SaveSlot:
    """Instead of a plan: every rank sends rank 0 its heads of the slot's state (a snapshot
    made with `spec`), which rank 0 joins into one (`TensorParallelExecutor.snapshot`)."""

    slot: int
    spec: SnapshotSpec


@dataclass(slots=True)
class AdmittedRequest:
    request: CoreRequest
    slots: list[int]
    # The saved state it continues from: every head in rank 0's plan, the rank's own block
    # in the plan that rank gets (`for_rank`).
    resume: StateSnapshot | None = None


@dataclass(slots=True)
class StepPlan:
    admitted: list[AdmittedRequest] = field(default_factory=list)
    decodes: list[tuple[str, int]] = field(default_factory=list)  # (request id, choice)
    # (id, start, length, the cache rows saved to after it and restored from before it)
    prefills: list[tuple[str, int, int, int | None, int | None]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # requests gone since the last plan


def plan_of(scheduled: SchedulerOutput) -> StepPlan:
    """What the other ranks need to run `scheduled` exactly as rank 0 will."""
    return StepPlan(
        admitted=[
            AdmittedRequest(r.core, [seq.slot for seq in r.sequences], r.resume)
            for r in scheduled.admitted
        ],
        decodes=[(seq.request.request_id, seq.index) for seq in scheduled.decodes],
        prefills=[
            (c.request.request_id, c.start, c.length, c.save_to, c.restore_from)
            for c in scheduled.prefills
        ],
        removed=list(scheduled.removed),
    )


def resumes(plan: StepPlan) -> bool:
    return any(entry.resume is not None for entry in plan.admitted)


def for_rank(plan: StepPlan, rank: int, size: int) -> StepPlan:
    """`plan` as rank `rank` of `size` gets it: a continued state's heads cut to its block
    (a 1/size share of the bytes)."""
    admitted = [
        entry if entry.resume is None
        else dataclasses.replace(entry, resume=rank_heads(entry.resume, rank, size, copy=True))
        for entry in plan.admitted
    ]
    return dataclasses.replace(plan, admitted=admitted)


class Mirror:
    """A rank's copies of the running requests: token ids, params and slots, no outputs."""

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}

    def apply(self, plan: StepPlan) -> SchedulerOutput:
        for request_id in plan.removed:
            self.requests.pop(request_id, None)
        admitted = []
        for entry in plan.admitted:
            request = Request.of(entry.request, [None] * len(entry.slots))
            if entry.resume is not None:  # as rank 0's core continued it
                request.continue_from(entry.resume)
            for seq, slot in zip(request.sequences, entry.slots, strict=True):
                seq.slot = slot
            self.requests[request.request_id] = request
            admitted.append(request)
        decodes: list[Sequence] = [self.requests[rid].sequences[i] for rid, i in plan.decodes]
        prefills = [
            PrefillChunk(self.requests[rid], *chunk) for rid, *chunk in plan.prefills
        ]
        return SchedulerOutput(admitted, decodes, prefills, [])
