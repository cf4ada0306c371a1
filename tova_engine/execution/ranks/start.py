"""Watching the other ranks start, so that one that fails ends the start at once.

Each rank reports over its link (`links.py`) as it goes: `Joining` just before it joins the
group, `Ready` once it has built its shard (weights loaded, state allocated), or `Failed`
with its error before it exits. Rank 0 waits for the reports and for the ranks' processes
at once (`wait_for`): a rank that raises, or whose process ends for any reason (killed, out
of memory, a script the spawned interpreter cannot import), ends the wait with that rank's
error within a poll, instead of leaving rank 0 in a collective until its timeout.
Rank 0 joins the group only once every rank said `Joining`, so the rendezvous itself waits
for live ranks. `distributed_timeout_seconds` bounds a rank that hangs: from its spawn to its
`Joining`, and forming the group (a rank that dies inside the rendezvous is seen when it times
out); loading has no bound (a large model loads for minutes, and a rank that dies while
loading is seen at once anyway).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from tova_engine.execution.ranks.links import Link


@dataclass(frozen=True, slots=True)
class Joining:
    """The rank is alive and about to join the group."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The rank joined the group and built its shard; it captures its graphs next."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The rank raised while starting (it exits next)."""

    error: str  # "Type: message"
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> Failed:
        return cls(f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc)))


class RemoteTraceback(Exception):
    """The failed rank's traceback, as the cause of the error rank 0 raises."""

    def __str__(self) -> str:
        return self.args[0]


class RankStartError(RuntimeError):
    """A tensor-parallel rank failed, exited or hung while the engine started."""


def wait_for(report: type, links: list[Link], processes: list[BaseProcess], stage: str,
             timeout_s: float | None = None) -> None:
    """Until every rank has sent `report`. Raises RankStartError naming the first rank that
    failed or whose process ended while `stage` ("starting", "loading its shard"), or, past
    timeout_s, the ranks that have not reported."""
    waiting = {link.rank: (link, process) for link, process in zip(links, processes, strict=True)}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while waiting:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait([obj for link, process in waiting.values()
                      for obj in (link.connection, process.sentinel)], timeout=left)
        if not ready:
            ranks = ", ".join(map(str, waiting))
            raise RankStartError(
                f"tensor-parallel rank {ranks} did not finish {stage} within {timeout_s:g} s "
                "(distributed_timeout_seconds)"
            )
        for rank in _settled(waiting, ready, stage, report):
            del waiting[rank]


def raise_if_failed(links: list[Link], processes: list[BaseProcess], stage: str) -> None:
    """Raises RankStartError if a rank has failed or its process has ended (no waiting)."""
    waiting = {link.rank: (link, process) for link, process in zip(links, processes, strict=True)}
    _settled(waiting, wait([p.sentinel for p in processes], timeout=0), stage, None)


def _settled(waiting: dict[int, tuple[Link, BaseProcess]], ready: list, stage: str,
             report: type | None) -> list[int]:
    """The ranks among `waiting` that have sent `report`; raises for one that failed or
    whose process ended."""
    settled = []
    for rank, (link, process) in waiting.items():
        # A report first: a rank that failed sent why before its process ended.
        if link.connection in ready or link.connection.poll():
            if _received(link, process, stage) is report:
                settled.append(rank)
        elif process.sentinel in ready:
            raise RankStartError(_exited(rank, process, stage))
    return settled


def _received(link: Link, process: BaseProcess, stage: str) -> type:
    try:
        message = link.receive()
    except (EOFError, OSError):  # its end closed without a word: the process is ending
        raise RankStartError(_exited(link.rank, process, stage)) from None
    if isinstance(message, Failed):
        raise RankStartError(
            f"tensor-parallel rank {link.rank} failed while {stage}: {message.error}"
        ) from RemoteTraceback(message.traceback)
    return type(message)


def _exited(rank: int, process: BaseProcess, stage: str) -> str:
    process.join(5)  # its sentinel is ready: the exit status is there to collect
    code = process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 \
        else f"exited with status {code}"
    return f"tensor-parallel rank {rank}'s process {how} while {stage}{_main_hint()}; its " \
           "log above says why"


def _main_hint() -> str:
    """Why a spawned rank may die before running a line of the engine: it re-imports the
    parent's main script first, and a `python -` heredoc's ('<stdin>') is no file."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or path is None or os.path.exists(path):
        return ""
    return (f" (spawned ranks re-import the main script, and {path!r} is not a file: run the "
            "script from a file, building the engine under `if __name__ == '__main__':`)")
