"""Settings of the HTTP server (the engine's live in `tova_engine.EngineConfig`).

Each field carries its `tova-serve` flag's help text (`setting`); server/cli.py builds the
flags from the fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from server.chat_template import load_chat_template, shipped_names
from tova_engine.config import setting
from tova_engine.execution.threads import usable_cpus
from tova_engine.validation import is_finite_number, require_positive_int

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
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# What --reasoning-parser accepts: the models whose <think> block server/serving/reasoning.py
# splits out.
REASONING_PARSERS = ("qwen3",)
# What --tool-call-parser accepts: the call syntaxes server/serving/tool_calls/ reads.
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    # The first is the one responses report by default. Empty: the engine's model name.
    served_model_names: tuple[str, ...] = setting(
        (), "names clients may use in `model`; default: the model's name",
        flag="--served-model-name")
    # None leaves the API open. The key itself must never appear in --help or the log: the
    # help names where the default comes from, the log says whether one is set.
    api_key: str | None = setting(
        None, "require 'Authorization: Bearer KEY' on /v1/*; default: env TOVA_API_KEY, else "
              "none (the API is open)", env="TOVA_API_KEY", log_as="set")
    # Needs api_key.
    protect_metrics: bool = setting(False, "also require the API key on /metrics")
    # Front-end processes (HTTP, tokenizing, detokenizing, streaming) sharing one engine core
    # and one listening socket (server/api_servers.py).
    api_server_count: int | Literal["auto"] = setting(
        "auto", "front-end processes sharing the engine core: each has its own event loop, "
                "detokenizer and streams; auto: 1 below 8 usable CPUs (affinity, container "
                "quota), else a quarter of them, at most 4")
    # Where stored responses live when several front ends must all find them (set by the
    # supervisor; None: beside the state store's directory, or in memory).
    responses_dir: str | None = None
    # Beyond it new requests get 429 (per front end). None: unbounded.
    max_queue_len: int | None = setting(
        None, "requests allowed to wait for a slot before 429; default: no limit")
    # Seconds a refused client is told to wait before retrying.
    retry_after_s: int = 1
    max_request_body_bytes: int = setting(
        DEFAULT_MAX_REQUEST_BODY_BYTES, "larger request bodies get 413 before they are parsed")
    # After SIGTERM/SIGINT, how long in-flight requests may run before they are cut.
    shutdown_timeout_s: float = setting(
        DEFAULT_SHUTDOWN_TIMEOUT_S, "seconds in-flight requests may run after SIGTERM/SIGINT "
                                    "while new ones get 503", flag="--shutdown-timeout")
    # uvicorn's timeout_keep_alive.
    timeout_keep_alive_s: float = setting(
        DEFAULT_TIMEOUT_KEEP_ALIVE_S, "seconds an idle keep-alive connection stays open; keep it "
                                      "above the idle timeout of the clients and proxies in "
                                      "front", flag="--timeout-keep-alive")
    log_level: str = setting("info", "of the server's and the engine's logs", choices=LOG_LEVELS)
    # Never the prompt text.
    access_log: bool = setting(True, "no log line per request (id, status, timings)",
                               flag="--disable-access-log")
    # They may hold private data.
    log_requests: bool = setting(
        False, "also log each generation request's body: prompts and parameters")
    # JSON output constraints (response_format, structured_outputs, guided_json) without free
    # whitespace: compact JSON. Requests may say otherwise (disable_any_whitespace).
    disable_any_whitespace: bool = setting(
        True, "let JSON output constraints allow free whitespace between tokens (vLLM's "
              "disable_any_whitespace off); otherwise the JSON is compact, as a small model "
              "given the choice pads it with blank lines",
        flag="--structured-outputs-any-whitespace")
    # See server/http/request_fields.py.
    strict_request_fields: bool = setting(
        False, "refuse request fields that are neither OpenAI's nor this server's (400 naming "
               "the field) instead of logging each once and ignoring it, as vLLM does")
    # See server/http/fault_injection.py.
    enable_fault_injection: bool = setting(
        False, "testing only: honour the X-Tova-Fault request header (docs/reliability.md); "
               "never in production")
    # See server/serving/reasoning.py.
    reasoning_parser: str | None = setting(
        None, "split a reasoning model's <think> block into reasoning_content (qwen3); "
              "default: none, the thinking stays in the content", choices=REASONING_PARSERS)
    # See server/serving/tool_calls/registry.py.
    tool_call_parser: str = setting(
        "auto", "how the model writes tool calls: hermes (<tool_call> blocks: Qwen, Hermes, "
                "SmolLM), llama3_json (Llama 3.x JSON), mistral ([TOOL_CALLS]); auto: the one "
                "the chat template shows, else hermes", choices=TOOL_CALL_PARSERS)
    # The template's text; the flag takes a shipped template's name, a file or the text.
    chat_template: str | None = setting(
        None, "the chat template to use instead of the tokenizer's (or where it has none): a "
              "shipped one (" + ", ".join(shipped_names()) + "), a Jinja file, or the template "
              "text; default: the tokenizer's", metavar="NAME|FILE|TEMPLATE",
        convert=load_chat_template, log_as="given")

    @property
    def front_ends(self) -> int:
        """How many front-end processes to run (`api_server_count` resolved)."""
        if self.api_server_count != "auto":
            return self.api_server_count
        return auto_api_server_count(usable_cpus())

    def __post_init__(self) -> None:
        if self.max_queue_len is not None:
            require_positive_int("max_queue_len", self.max_queue_len)
        if self.api_server_count != "auto":
            require_positive_int("api_server_count", self.api_server_count)
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.protect_metrics and self.api_key is None:
            raise ValueError("protect_metrics needs an api_key to protect /metrics with")
        if any(not name for name in self.served_model_names):
            raise ValueError("served model names must not be empty")
        require_positive_int("max_request_body_bytes", self.max_request_body_bytes)
        timeout = self.shutdown_timeout_s
        if not (is_finite_number(timeout) and timeout >= 0):
            raise ValueError(f"shutdown_timeout_s must be a number >= 0; got {timeout!r}")
        keep_alive = self.timeout_keep_alive_s
        if not (is_finite_number(keep_alive) and keep_alive > 0):
            raise ValueError(f"timeout_keep_alive_s must be a number > 0; got {keep_alive!r}")


def auto_api_server_count(cores: int) -> int:
    """One front end streams a few thousand tokens a second and keeps a core busy doing it;
    the engine core and the system need theirs. Measured (docs/benchmarks.md): on 2 cores a
    second front end only cut the latency tail; on 16 cores with 1,024 streams four gave
    1.08x the throughput and a third less TTFT."""
    if cores < 8:
        return 1
    return min(4, cores // 4)
