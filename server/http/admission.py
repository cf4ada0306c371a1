"""The queue limit: how many requests may wait for a slot before new ones are refused.

A request waits from the moment the server hands it to the engine until the scheduler gives
it a slot. The engine's own waiting queue misses requests still in its inbox, so the server
counts what it has submitted and not yet seen finish, minus what the engine is running.
That over-counts only for the instant between a request finishing in the engine and the
server hearing of it, so the limit errs on the side of refusing.
"""

from __future__ import annotations

from collections.abc import Callable

from server.http.errors import APIError


class Admission:
    def __init__(self, num_running: Callable[[], int], max_queue_len: int | None,
                 retry_after_s: int = 1, on_change: Callable[[], None] | None = None) -> None:
        self._num_running = num_running
        self.max_queue_len = max_queue_len
        self.retry_after_s = retry_after_s
        # Told when `submitted` changes (the waiting gauge is written, not read, with several
        # front ends: server/metrics).
        self.on_change = on_change
        # Engine requests submitted (or about to be) and not finished; event-loop thread only.
        self.submitted = 0

    def waiting(self) -> int:
        return max(0, self.submitted - self._num_running())

    def admit(self, count: int) -> Ticket:
        """Reserve places for `count` engine requests, or refuse with 429 if the queue is full.
        Check and reservation happen without an await between them, so a burst of arrivals
        cannot all slip past the limit."""
        if self.max_queue_len is not None and self.waiting() >= self.max_queue_len:
            raise APIError(
                429,
                f"the server's queue is full ({self.max_queue_len} requests waiting for a "
                "slot); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.submitted += count
        self.changed()
        return Ticket(self, count)

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class Ticket:
    """Places held by one HTTP request; each is given back once, however the request ends."""

    __slots__ = ("_admission", "_held")

    def __init__(self, admission: Admission, count: int) -> None:
        self._admission = admission
        self._held = count

    def release(self, count: int = 1) -> None:
        count = min(count, self._held)
        self._held -= count
        self._admission.submitted -= count
        self._admission.changed()

    def release_all(self) -> None:
        self.release(self._held)
