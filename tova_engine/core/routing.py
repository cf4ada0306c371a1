"""Which front end owns each request, and each step's outputs cut into one message per front end.

With one front end a step's `StepOutputs` goes out whole. With several (`--api-server-count`),
each gets the rows, finishes, failures, prompt log-probs and cache hits of its own requests,
and every one gets the engine-wide parts: the step's stats (each front end's metrics and
admission read them) and the state store's changes (any front end may continue any saved
state). Runs on the core's sending thread, off the step loop.
"""

from __future__ import annotations

import threading

from tova_engine.core.messages import StepOutputs

_ROW_COLUMNS = ("request_ids", "indexes", "token_ids", "logprobs", "ranks", "top_ids",
                "top_logprobs")


class OutputRouter:
    def __init__(self, clients: int) -> None:
        if clients < 1:
            raise ValueError(f"clients must be at least 1; got {clients}")
        self.clients = clients
        # Request id -> [owning front end, choices not yet finished]. Written on the
        # receiving thread (register) and the sending thread (split); each dict operation
        # is atomic, and the lock keeps a count's read-modify-write whole.
        self._owners: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def register(self, request_id: str, client: int, choices: int) -> None:
        if self.clients == 1:
            return
        if not 0 <= client < self.clients:
            raise ValueError(f"client must be in [0, {self.clients}); got {client}")
        with self._lock:
            # Ids are unique across front ends (random); a clash keeps the running one's.
            self._owners.setdefault(request_id, [client, choices])

    def owner(self, request_id: str) -> int | None:
        entry = self._owners.get(request_id)
        return None if entry is None else entry[0]

    def requests_of(self, clients: list[int]) -> list[str]:
        wanted = set(clients)
        with self._lock:
            return [rid for rid, (client, _) in self._owners.items() if client in wanted]

    def split(self, step: StepOutputs) -> list[StepOutputs]:
        """One message per front end (index = front end). Rows of requests nobody owns (an
        abort already settled them) are dropped."""
        if self.clients == 1:
            return [step]
        parts = [StepOutputs(step.started_at, [], [], [], [], stats=step.stats,
                             saved=step.saved, dropped=step.dropped, store=step.store)
                 for _ in range(self.clients)]
        self._split_rows(step, parts)
        for request_id in step.admitted:
            if (part := self._part(parts, request_id)) is not None:
                part.admitted.append(request_id)
        for request_id, tokens in step.cached_tokens.items():
            if (part := self._part(parts, request_id)) is not None:
                part.cached_tokens[request_id] = tokens
        for name in ("prompt_logprobs", "failed", "finished"):
            for item in getattr(step, name):
                if (part := self._part(parts, item.request_id)) is not None:
                    getattr(part, name).append(item)
        self._forget(step)
        return parts

    def _part(self, parts: list[StepOutputs], request_id: str) -> StepOutputs | None:
        client = self.owner(request_id)
        return None if client is None else parts[client]

    def _split_rows(self, step: StepOutputs, parts: list[StepOutputs]) -> None:
        rows: list[list[int]] = [[] for _ in range(self.clients)]
        for row, request_id in enumerate(step.request_ids):
            client = self.owner(request_id)
            if client is not None:
                rows[client].append(row)
        for part, picked in zip(parts, rows, strict=True):
            if not picked:
                continue
            for name in _ROW_COLUMNS:
                column = getattr(step, name)
                if column is not None:
                    setattr(part, name, [column[row] for row in picked])

    def _forget(self, step: StepOutputs) -> None:
        """A request is done when every choice has finished, or when it failed."""
        with self._lock:
            for finish in step.finished:
                entry = self._owners.get(finish.request_id)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._owners[finish.request_id]
            for failure in step.failed:
                self._owners.pop(failure.request_id, None)
