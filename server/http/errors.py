"""Every error leaves the server in OpenAI's shape: {"error": {message, type, param, code}}.

FastAPI's own 422 validation responses and Starlette's plain-text 404/405 are replaced, and
an unexpected exception becomes a 500 whose body carries no traceback.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol.common import ErrorInfo, ErrorResponse
from tova_engine import EngineDeadError, InvalidRequestError, RequestFailedError
from tova_engine.errors import UnknownStateError

logger = logging.getLogger("server")

# OpenAI's error types by status; clients branch on the status, the type is for people.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# pydantic's error types for a body that is not an object (or is missing).
_NOT_AN_OBJECT = frozenset({"model_attributes_type", "dict_type", "model_type", "missing"})


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        kind = _TYPES.get(self.status, HTTPStatus(self.status).phrase.lower().replace(" ", "_"))
        return ErrorResponse(error=ErrorInfo(
            message=printable(self.message), type=kind,
            param=None if self.param is None else printable(self.param), code=self.code,
        ))

    def response(self) -> Response:
        return Response(
            self.body().to_json(), status_code=self.status, media_type="application/json",
            headers=self.headers,
        )


def printable(text: str) -> str:
    """`text` as valid UTF-8: a lone surrogate from a JSON escape ("\\ud800") that an error
    repeats back would make the error itself fail to serialise."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def from_value_error(exc: ValueError, params: dict[str, str]) -> APIError:
    """The engine names the parameter it refuses (`InvalidRequestError.param`); `params`
    maps the engine's name to this request's field."""
    message = str(exc)
    if isinstance(exc, UnknownStateError):
        return not_found_response(exc.param)
    name = exc.param if isinstance(exc, InvalidRequestError) else None
    param = params.get(name) if name else None
    if param is not None and param != name:
        # Speak the client's language: "top_logprobs must be <= 20", not "logprobs ...".
        if name == "prompt" or not message.startswith(name):
            message = f"{param}: {message}"
        else:
            message = param + message[len(name):]
    return bad_request(message, param)


def not_found_response(param: str | None = "previous_response_id",
                       response_id: str | None = None) -> APIError:
    what = f"Response with id '{response_id}'" if response_id else "That response"
    return APIError(404, f"{what} not found (never stored, deleted or expired).", param,
                    "not_found")


def from_engine_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineDeadError):
        return APIError(503, "the engine is not running; the server cannot serve requests",
                        code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"the request failed in the engine: {exc}", code="engine_error")
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request("the request body is not valid JSON")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc and first.get("type") in _NOT_AN_OBJECT:
        # Also what a body sent with another Content-Type than JSON comes to.
        return bad_request("the request body must be a JSON object, sent with "
                           "Content-Type: application/json")
    # A model's own check names its param (a whole-body one, see
    # `protocol.common.RequestModel`; a message's, below its index).
    named = (first.get("ctx") or {}).get("param")
    param = ".".join([*loc, named] if named else loc) or None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc and not message.startswith(loc[-1]):
        message = f"{param}: {message}"
    return bad_request(message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return from_engine_error(exc).response()
