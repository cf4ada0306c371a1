"""Testing only: make one request fail inside the engine, on demand.

A server started with `--enable-fault-injection` honours the request header
`X-Tova-Fault: FAULT`; without the flag the header is ignored. FAULT is one of

    nan-logits      the request's logits rows become NaN (as from a numerical fault in the
    nan-logits:N    model); with N, only once it has N tokens. The sampler sees a non-finite
                    row and the engine fails that request alone: HTTP 500, or an error event
                    in a stream; its slot is freed and the batch's other requests go on.
    fail-step       the engine step raises an ordinary error: every request in that step
                    fails (HTTP 500, or an error event), and the engine goes on.
    kill-engine     the engine step raises an error it does not contain, so the engine core
                    process exits: every request in flight ends with an error at once,
                    /ready is 503 while the server restarts the core, then 200 again.
    delay:SECONDS   each token of this request takes SECONDS longer (the engine core
                    sleeps): a slow request, to have something in flight.

The faults are logits processors, the engine's own per-request hook: they run in the engine
core process inside the step, exactly where a real fault would arise, and the engine needs
no test code (they travel there pickled, so they are module-level names). A header rather
than a body field keeps the API's schema (and its strict refusal of unknown fields) the same
with the flag on or off.
"""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.requests import Request

from server.http.errors import bad_request
from tova_engine.sampling_params import LogitsProcessor

HEADER = "x-tova-fault"
USAGE = "X-Tova-Fault must be nan-logits, nan-logits:N, fail-step, kill-engine or delay:SECONDS"


class EngineKilled(BaseException):
    """A BaseException, not an Exception: the engine contains a failing step's Exception (it
    fails that step's requests), so only this reaches and ends the loop."""


def fault_processors(request: Request, enabled: bool) -> list[LogitsProcessor]:
    value = request.headers.get(HEADER) if enabled else None
    return [] if value is None else [parse_fault(value)]


def parse_fault(value: str) -> LogitsProcessor:
    name, _, argument = value.strip().partition(":")
    if name == "nan-logits":
        return _NanLogits(_number(argument or "0", int))
    if name == "fail-step" and not argument:
        return _fail_step
    if name == "kill-engine" and not argument:
        return _kill_engine
    if name == "delay" and argument:
        return _Delay(_number(argument, float))
    raise bad_request(f"{USAGE}; got {value!r}")


def _number(text: str, kind: type[int] | type[float]) -> Any:
    try:
        number = kind(text)
    except ValueError:
        number = -1
    if not (math.isfinite(number) and number >= 0):
        raise bad_request(f"{USAGE}; got {text!r}")
    return number


class _NanLogits:
    __slots__ = ("after",)

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, output_ids: list[int], logits: Any) -> Any:
        if len(output_ids) >= self.after:
            logits.fill_(math.nan)
        return logits


def _fail_step(output_ids: list[int], logits: Any) -> Any:
    raise RuntimeError("simulated device fault (X-Tova-Fault: fail-step)")


def _kill_engine(output_ids: list[int], logits: Any) -> Any:
    raise EngineKilled("X-Tova-Fault: kill-engine")


class _Delay:
    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, output_ids: list[int], logits: Any) -> Any:
        time.sleep(self.seconds)
        return logits
