"""uvicorn's HTTP/1.1 protocol, with a keep-alive timer that never closes a connection whose
next request has already arrived.

uvicorn arms `timeout_keep_alive` when a response ends and, when the timer fires, closes the
socket without reading it. asyncio polls its sockets once per loop iteration and then runs the
timers due by the time the poll returned. When the loop stalls (another thread holding the GIL,
a blocking call) past a connection's deadline, a request that arrived after the last poll is
still unread when that connection's timer runs: the socket is closed with the request in it,
the kernel answers with a reset, and the client's request fails with no response byte and no
log line. Here the timer looks at the socket first and leaves anything readable (a request, or
the client's own close) to the loop.
"""

from __future__ import annotations

import asyncio
import select

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class KeepAliveProtocol(AutoHTTPProtocol):  # h11's, or httptools' where it is installed
    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing() and _readable(self.transport):
            # The loop reads it next: a request cancels this timer in data_received, the
            # client's close ends the connection. The timer stays as a backstop.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)
            return
        super().timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # uvicorn cancels the timer only on a clean close; after a reset it would keep the
        # connection's objects alive for `timeout_keep_alive` seconds.
        self._unset_keepalive_if_required()


def _readable(transport: asyncio.BaseTransport) -> bool:
    """Bytes or a FIN wait in the socket, not yet read by the loop."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()  # unlike select(), no limit on the descriptor's number
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))
