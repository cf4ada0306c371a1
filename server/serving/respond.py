"""One way out for generation endpoints: an event stream, or a JSON body once done."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response

from server.http.cancellation import unless_disconnected
from server.http.errors import APIError, bad_request, from_engine_error
from server.http.sse import EventStreamResponse
from server.protocol.common import ResponseModel
from server.serving.generation import GenerationRun


class Session(Protocol):
    def collect(self, run: GenerationRun) -> Awaitable[ResponseModel]: ...

    def stream(self, run: GenerationRun) -> AsyncIterator[str]: ...


def json_response(body: ResponseModel, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(body.to_json(), status_code=status, media_type="application/json",
                    headers=headers)


async def respond(request: Request, streaming: bool, session: Session,
                  run: GenerationRun, headers: dict[str, str] | None = None) -> Response:
    """headers: sent with the response (a stream's before its first event)."""
    if streaming:
        return EventStreamResponse(session.stream(run), on_close=run.close, headers=headers)
    try:
        result = await unless_disconnected(request, session.collect(run))
    except APIError:
        raise
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    except Exception as exc:
        raise from_engine_error(exc) from None
    finally:
        await run.close()
    return result if isinstance(result, Response) else json_response(result, headers=headers)
