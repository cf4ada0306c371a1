"""One log line per HTTP request: its id, status and timings, never its prompt.

Every request gets an id, returned in the `X-Request-Id` header; a generation request's id is
the one in its response body (`cmpl-...`, `chatcmpl-...`), so a client's report, the log
and the response can be matched. The line is written when the response's last byte has
left (streams included), on the `server.access` logger:

    request_id=cmpl-1f0e... method=POST path=/v1/completions status=200 duration_ms=812.4
    client=127.0.0.1:50514 prompt_tokens=12 completion_tokens=16 queue_ms=0.9 ttft_ms=95.3
    finish=length

Prompts and outputs stay out of it: they may hold private data. `--log-requests` adds one
line per generation request with its body (`log_request_body`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tova_engine import RequestOutput

access_logger = logging.getLogger("server.access")
REQUEST_ID_HEADER = b"x-request-id"
# A logged body longer than this is cut: a log line must stay a line, not a file.
MAX_LOGGED_BODY_CHARS = 16384


@dataclass(slots=True)
class GenerationRecord:
    """What a generation request adds to its log line; filled as its outputs arrive."""

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    arrival: float | None = None  # the engine's clock (time.time())
    first_scheduled: float | None = None
    first_token: float | None = None
    finish_reasons: dict[str, None] = field(default_factory=dict)  # ordered set

    def observe(self, output: RequestOutput) -> None:
        """`output` holds deltas: only the tokens new since the previous one."""
        self.completion_tokens += sum(len(choice.token_ids) for choice in output.outputs)
        m = output.metrics
        self.arrival = _earliest(self.arrival, m.arrival_time)
        self.first_scheduled = _earliest(self.first_scheduled, m.first_scheduled_time)
        self.first_token = _earliest(self.first_token, m.first_token_time)
        for choice in output.outputs:
            if choice.finish_reason is not None:
                self.finish_reasons[choice.finish_reason] = None

    def fields(self) -> str:
        parts = [f"prompt_tokens={self.prompt_tokens}",
                 f"completion_tokens={self.completion_tokens}"]
        if self.arrival is not None:
            for name, at in (("queue_ms", self.first_scheduled), ("ttft_ms", self.first_token)):
                if at is not None:
                    parts.append(f"{name}={(at - self.arrival) * 1000:.1f}")
        if self.finish_reasons:
            parts.append("finish=" + ",".join(self.finish_reasons))
        return " ".join(parts)


def _earliest(current: float | None, new: float | None) -> float | None:
    if new is None:
        return current
    return new if current is None else min(current, new)


def name_request(request: Request, prefix: str) -> str:
    """Give a generation request the id its response carries: `prefix` and its own id
    (`cmpl-<hex>`, `resp_<hex>`)."""
    request.state.request_id = prefix + request.state.request_id
    return request.state.request_id


def track_generation(request: Request, record: GenerationRecord) -> None:
    """Add the generation's counts and timings to this request's log line."""
    request.state.generation = record


def log_request_body(request_id: str, body: BaseModel) -> None:
    """The `--log-requests` line: the request as validated, prompt and parameters included."""
    text = body.model_dump_json(exclude_unset=True)
    if len(text) > MAX_LOGGED_BODY_CHARS:
        text = f"{text[:MAX_LOGGED_BODY_CHARS]}...({len(text) - MAX_LOGGED_BODY_CHARS} more chars)"
    access_logger.info("request_id=%s body=%s", request_id, text)


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, enabled: bool) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = uuid.uuid4().hex
        status = 500  # if the app raises before starting a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Read now: a generation route renames the request before it responds.
                header = (REQUEST_ID_HEADER, state["request_id"].encode())
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                self._log(scope, state, status, time.perf_counter() - started)

    @staticmethod
    def _log(scope: Scope, state: dict, status: int, duration_s: float) -> None:
        client = scope.get("client")
        line = (f"request_id={state['request_id']} method={scope['method']} "
                f"path={_quoted(scope['path'])} status={status} "
                f"duration_ms={duration_s * 1000:.1f}")
        if client:
            line += f" client={client[0]}:{client[1]}"
        record = state.get("generation")
        if record is not None:
            line += " " + record.fields()
        access_logger.info(line)


def _quoted(text: str) -> str:
    """Paths are decoded from the URL, so a client could put a line break in one: anything
    but plain printable ASCII is written as a JSON string."""
    if text.isascii() and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)
