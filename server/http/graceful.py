"""uvicorn's server with a drain in front of its own shutdown.

The first SIGTERM or SIGINT starts the drain (`server.http.drain`): new requests get 503 while the
in-flight ones run on, until none is left or `timeout_s` has passed; then the connections of
requests still running are closed (those clients see the connection close before their
response ended, never a truncated success, and their engine requests are aborted). uvicorn's
own shutdown follows and the process exits 0. A second signal skips the rest of the drain.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from server.http.drain import Drain

logger = logging.getLogger("server")
# After the drain, the last bytes of finished responses still have to leave.
FLUSH_TIMEOUT_S = 1.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._timeout_s = timeout_s
        self._deadline: float | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: set flags only; `on_tick` does the rest. The signal is not
        # recorded for uvicorn to raise again after shutdown, which would make the exit
        # status "killed by SIGTERM" instead of 0.
        if self._deadline is None and not self.should_exit:
            self._deadline = time.monotonic() + self._timeout_s
            self._drain.start()
            return
        self.should_exit = True
        self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._deadline is not None and not self.should_exit:
            self._check_drain()
        return await super().on_tick(counter)

    def _check_drain(self) -> None:
        in_flight = self._drain.in_flight
        if not self._announced:
            self._announced = True
            logger.info("shutting down: new requests get 503; waiting up to %.1f s for %d "
                        "in-flight request(s)", self._timeout_s, in_flight)
        if in_flight == 0:
            logger.info("drained: no request in flight")
            self.should_exit = True
        elif time.monotonic() >= self._deadline:
            logger.warning("shutdown timeout (%.1f s) reached: cutting %d request(s) still in "
                           "flight", self._timeout_s, in_flight)
            self._cut_connections()
            self.should_exit = True

    def _cut_connections(self) -> None:
        """Close every connection. What was written still leaves; each request still running
        hears its client go, so it aborts its engine requests and ends as after any hang-up
        (uvicorn would otherwise cancel it mid-await, with a traceback per request)."""
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()
