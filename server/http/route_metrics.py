"""HTTP request count and latency by route template and status (pure ASGI, so streamed
responses are timed to their last byte and nothing is buffered)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import ServerMetrics

# Paths that match no route share one label, so scanners cannot blow up the series count.
UNMATCHED = "unmatched"


class HTTPMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Sequence[Route]) -> None:
        self.app = app
        self.metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before starting a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_http(scope["method"], self._route(scope), status,
                                      time.perf_counter() - started)

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return route.path
        # Refused before routing (a 401 from the key check): find the route it was for.
        for candidate in self._routes:
            if candidate.matches(scope)[0] is not Match.NONE:
                return candidate.path
        return UNMATCHED
