"""Graceful shutdown, the app's side: once draining, new requests get 503 while those already
in flight run on; `in_flight` tells the server (`server.http.graceful`) when it may stop.

The listening socket stays open during the drain, so a client (or a load balancer's health
check) hears "shutting down" in OpenAI's error shape instead of a refused connection.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from server.http.errors import APIError

# Prometheus may still scrape a draining server: its last figures are the interesting ones.
OPEN_WHILE_DRAINING = frozenset({"/metrics"})


class Drain:
    """Event-loop thread only."""

    __slots__ = ("draining", "in_flight")

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0  # HTTP requests between arrival and their response's last byte

    def start(self) -> None:
        self.draining = True


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in OPEN_WHILE_DRAINING:
            await _shutting_down().response()(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


def _shutting_down() -> APIError:
    return APIError(
        503, "the server is shutting down and takes no new requests; retry on another replica",
        code="shutting_down",
        # A keep-alive connection would bring the client straight back here.
        headers={"Connection": "close"},
    )
