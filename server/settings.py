"""Settings of the HTTP layer (the engine's live in `tova_engine.EngineConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Large enough for a batch of long token-id prompts (8192 ids of 5 digits are ~50 KB), small
# enough that a client cannot make the server buffer gigabytes before it is refused.
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 2**20
# Below `docker stop`'s grace (10 s, then SIGKILL) and Kubernetes' (30 s), so the drain ends
# before the process is killed; raise it together with the orchestrator's.
DEFAULT_SHUTDOWN_TIMEOUT_S = 8.0
# Longer than the idle expiry of the clients and proxies in front (httpx 5 s; nginx's upstream
# keepalive_timeout and AWS ALB 60 s), so that they, not the server, close an idle connection:
# a client never sends a request into a close already under way (docs/serving.md).
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 75.0


@dataclass(frozen=True, slots=True)
class ServerSettings:
    # Names clients may put in `model`; the first is the one responses report by default.
    # Empty: the engine's model name.
    served_model_names: tuple[str, ...] = ()
    # Bearer token required on /v1/*; None leaves the API open.
    api_key: str | None = None
    # Also require the key on /metrics (needs api_key).
    protect_metrics: bool = False
    # Requests allowed to wait for a slot; beyond it new ones get 429. None: unbounded.
    max_queue_len: int | None = None
    # Seconds a refused client is told to wait before retrying.
    retry_after_s: int = 1
    # Request bodies above this many bytes are refused with 413 before they are parsed.
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    # After SIGTERM/SIGINT, how long in-flight requests may run before they are cut.
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    # Seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive).
    timeout_keep_alive_s: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S
    # One log line per HTTP request (id, status, timings); never the prompt text.
    access_log: bool = True
    # Also log each generation request's prompt and parameters (they may hold private data).
    log_requests: bool = False
    # Testing only: honour the X-Tova-Fault header (see server/fault_injection.py).
    enable_fault_injection: bool = False
    # Split reasoning models' thinking into `reasoning_content` (server/reasoning.py).
    reasoning_parser: str | None = None
    # A chat template (its text) replacing the tokenizer's, or giving one where it has none.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.max_queue_len is not None and not _positive_int(self.max_queue_len):
            raise ValueError(f"max_queue_len must be an integer >= 1; got {self.max_queue_len!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.protect_metrics and self.api_key is None:
            raise ValueError("protect_metrics needs an api_key to protect /metrics with")
        if any(not name for name in self.served_model_names):
            raise ValueError("served model names must not be empty")
        if not _positive_int(self.max_request_body_bytes):
            raise ValueError("max_request_body_bytes must be an integer >= 1; got "
                             f"{self.max_request_body_bytes!r}")
        timeout = self.shutdown_timeout_s
        if not (_finite_number(timeout) and timeout >= 0):
            raise ValueError(f"shutdown_timeout_s must be a number >= 0; got {timeout!r}")
        keep_alive = self.timeout_keep_alive_s
        if not (_finite_number(keep_alive) and keep_alive > 0):
            raise ValueError(f"timeout_keep_alive_s must be a number > 0; got {keep_alive!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
