"""Per-request metrics, observed as the request's outputs reach the server.

Inter-token latency is measured here, on the event loop, because that is when a token can
leave for the client: it includes the engine step and the hop from the engine thread.
"""

from __future__ import annotations

import time

from server.metrics import ServerMetrics
from tova_engine import RequestOutput


class RequestTracker:
    __slots__ = ("_finish_reasons", "_generated", "_last_token_at", "_metrics", "_saw_token")

    def __init__(self, metrics: ServerMetrics, num_choices: int) -> None:
        self._metrics = metrics
        self._finish_reasons: list[str | None] = [None] * num_choices
        self._last_token_at: list[float | None] = [None] * num_choices
        self._generated = 0
        self._saw_token = False

    def observe(self, output: RequestOutput) -> None:
        """`output` holds deltas: only the tokens new since the previous one."""
        now = time.monotonic()
        for choice in output.outputs:
            if choice.token_ids:
                self._observe_tokens(choice.index, len(choice.token_ids), now)
            if choice.finish_reason is not None:
                self._finish_reasons[choice.index] = choice.finish_reason
        if not self._saw_token and self._generated:
            self._saw_token = True
            first = output.metrics.first_token_time
            if first is not None:
                self._metrics.ttft.observe(first - output.metrics.arrival_time)
        if output.finished:
            self._observe_finished(output)

    def _observe_tokens(self, index: int, count: int, now: float) -> None:
        self._generated += count
        last = self._last_token_at[index]
        self._last_token_at[index] = now
        if last is None:  # the choice's first token: that latency is TTFT's
            return
        # Delta outputs carry one token per choice per step; split the gap if they bunch up.
        gap = (now - last) / count
        for _ in range(count):
            self._metrics.itl.observe(gap)

    def _observe_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        if m.finished_time is not None:
            self._metrics.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self._metrics.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        self._metrics.request_prompt_tokens.observe(len(output.prompt_token_ids))
        self._metrics.request_generation_tokens.observe(self._generated)

    def close(self, unfinished_reason: str) -> None:
        """Count every choice once: by its finish reason, or `unfinished_reason` ("abort",
        "error") for those the request ended without."""
        for reason in self._finish_reasons:
            self._metrics.count_finished(reason or unfinished_reason)
