"""Non-streaming requests stop when their client hangs up, as streaming ones do.

Starlette does not cancel a handler whose client has gone; without this, a dropped
non-streaming request would keep its slot until it generated every token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

T = TypeVar("T")
# nginx's "client closed request": nobody reads it, but the HTTP metrics record it.
CLIENT_CLOSED = 499


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request,
                              work: Coroutine[Any, Any, T]) -> T | Response:
    """`work`'s result, or a 499 response if the client disconnects first (then `work` is
    cancelled, which closes its engine streams and so aborts its requests)."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED)
    return task.result()
