"""Faults a test plants in a rank's start, through the environment the spawned rank inherits:
`TOVA_RANK_FAULT=RANK:STAGE:KIND` makes rank RANK, at STAGE (`start`: before it tells rank 0
it is joining; `join`: after that, before it joins the group; `load`: after joining, before
it builds its shard), KIND: `raise` a RuntimeError, `exit` its process with status 3, or
`hang`. Unset (always, outside tests) it does nothing.
A rank cannot be monkeypatched from the test's process: it is a fresh interpreter."""

from __future__ import annotations

import os
import time

ENV_VAR = "TOVA_RANK_FAULT"
STAGES = ("start", "join", "load")
KINDS = ("raise", "exit", "hang")


def plant(rank: int, stage: str) -> None:
    """Act out the planted fault if it is this rank's at this stage."""
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return
    fault_rank, fault_stage, kind = spec.split(":")
    if fault_stage not in STAGES or kind not in KINDS:
        raise ValueError(f"{ENV_VAR}={spec!r}: expected RANK:STAGE:KIND with STAGE one of "
                         f"{', '.join(STAGES)} and KIND one of {', '.join(KINDS)}")
    if int(fault_rank) != rank or fault_stage != stage:
        return
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        time.sleep(3600)
    raise RuntimeError(f"fault planted by {ENV_VAR}={spec}")
