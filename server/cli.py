"""`tova-serve`: load the engine, then serve the OpenAI-compatible API with uvicorn.

Engine flags take their defaults from `EngineConfig`, so the CLI and the library agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import uvicorn

from server.app import create_app
from server.chat_template import load_chat_template, shipped_names
from server.graceful import FLUSH_TIMEOUT_S, GracefulServer
from server.keepalive import KeepAliveProtocol
from server.reasoning import PARSERS
from server.settings import (
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    ServerSettings,
)
from tova_engine import AsyncEngine, EngineConfig, __version__
from tova_engine.config import DTYPES, KERNELS, LOAD_FORMATS
from tova_engine.policies import POLICIES

logger = logging.getLogger("server")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (defaults from tova_engine.EngineConfig)")
    group.add_argument("--model", default=DEFAULTS["model"],
                       help="Hugging Face folder, hub id, .gguf file or config .json (dummy); "
                            "default: the embedded SmolLM2-135M-Instruct")
    group.add_argument("--load-format", default=DEFAULTS["load_format"], choices=LOAD_FORMATS,
                       help="auto: safetensors when the folder has them, else GGUF; dummy: "
                            "random weights with the model's shapes")
    group.add_argument("--dtype", default=DEFAULTS["dtype"], choices=("auto", *DTYPES),
                       help="auto: bfloat16 on CUDA, float32 on CPU")
    group.add_argument("--device", default=DEFAULTS["device"],
                       help="auto (CUDA when present), cpu, cuda, cuda:N")
    group.add_argument("--state-size", type=int, default=DEFAULTS["state_size"],
                       help="key/value entries per layer per sequence")
    group.add_argument("--policy", default=DEFAULTS["policy"], choices=tuple(POLICIES),
                       help="which entry a full state drops")
    group.add_argument("--protect-recent", type=_count_or_fraction,
                       default=DEFAULTS["protect_recent"], metavar="R",
                       help="the latest R positions are never evicted: a count (64) or a "
                            "fraction of the state size (0.25); default: the policy's own "
                            "(tova: 0.5; 0 is the paper's TOVA)")
    group.add_argument("--max-num-seqs", type=_int_or_auto, default=DEFAULTS["max_num_seqs"],
                       metavar="N|auto",
                       help="state slots: choices that run at once; auto: as many as "
                            "--memory-utilization allows")
    group.add_argument("--memory-utilization", type=float,
                       default=DEFAULTS["memory_utilization"],
                       help="with --max-num-seqs auto: the share of the GPU's memory (CPU: of "
                            "the RAM available at start-up) that weights, state and "
                            "activations may take")
    group.add_argument("--prefill-chunk-size", type=int, default=DEFAULTS["prefill_chunk_size"],
                       help="prompt tokens one sequence prefills per step")
    group.add_argument("--max-num-batched-tokens", type=int,
                       default=DEFAULTS["max_num_batched_tokens"],
                       help="tokens (decodes + prefill chunks) one step may run; default: "
                            "max(2048, max-num-seqs + prefill-chunk-size)")
    group.add_argument("--max-model-len", type=int, default=DEFAULTS["max_model_len"],
                       help="longest prompt + output a request may ask for; default: the "
                            "model's position limit")
    group.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                       help="seed of the sampler for requests without their own")
    group.add_argument("--kernels", default=DEFAULTS["kernels"], choices=KERNELS,
                       help="auto: fused Triton kernels on CUDA when available; torch: PyTorch")
    group.add_argument("--enforce-eager", action="store_true", default=DEFAULTS["enforce_eager"],
                       help="CUDA: run every step eagerly, no captured decode or prefill "
                            "graphs")
    group.add_argument("--tensor-parallel-size", "-tp", type=int,
                       default=DEFAULTS["tensor_parallel_size"],
                       help="split the model over this many devices (processes; one GPU each "
                            "on CUDA); must divide the model's key/value heads")
    group.add_argument("--state-store-memory-bytes", type=int,
                       default=DEFAULTS["state_store_memory_bytes"],
                       help="host memory for saved states (stored responses); the least "
                            "recently used spill to --state-store-dir")
    group.add_argument("--state-store-dir", default=DEFAULTS["state_store_dir"],
                       help="directory saved states spill to and survive restarts in "
                            "(default: none, host memory only)")
    group.add_argument("--state-store-disk-bytes", type=int,
                       default=DEFAULTS["state_store_disk_bytes"],
                       help="disk space for saved states; the least recently used are deleted")
    group.add_argument("--max-prefill-graphs", type=int, default=DEFAULTS["max_prefill_graphs"],
                       help="CUDA: prefill chunk shapes that recur (rows, start, length) are "
                            "captured in graphs, this many at most; 0: prefill eagerly")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS["async_scheduling"],
                       help="launch each engine step before the previous one is read back, so "
                            "host work overlaps the device's (default: on with CUDA, off on "
                            "CPU)")
    group.add_argument("--cuda-graph-batch-sizes", type=int, nargs="+",
                       default=DEFAULTS["cuda_graph_batch_sizes"],
                       help="CUDA: decode batch sizes to capture; default: 1, 2, 4, 8, then "
                            "every 16 up to max-num-seqs")


def _count_or_fraction(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count or a fraction, got {text!r}") from None


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--reasoning-parser", choices=PARSERS, default=None,
                       help="split a reasoning model's <think> block into reasoning_content "
                            "(qwen3); default: none, the thinking stays in the content")
    group.add_argument("--chat-template", default=None, metavar="NAME|FILE|TEMPLATE",
                       help="the chat template to use instead of the tokenizer's (or where it "
                            "has none): a shipped one (" + ", ".join(shipped_names()) + "), a "
                            "Jinja file, or the template text; default: the tokenizer's")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="names clients may use in `model`; default: the model's name")
    # The key itself must never appear in --help: the help names where the default comes from.
    group.add_argument("--api-key", default=os.environ.get("TOVA_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on /v1/*; default: env "
                            "TOVA_API_KEY, else none (the API is open)")
    group.add_argument("--protect-metrics", action="store_true",
                       help="also require the API key on /metrics")
    group.add_argument("--max-queue-len", type=int, default=None,
                       help="requests allowed to wait for a slot before 429; default: no limit")
    group.add_argument("--max-request-body-bytes", type=int,
                       default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                       help="larger request bodies get 413 before they are parsed")
    group.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                       help="seconds in-flight requests may run after SIGTERM/SIGINT while new "
                            "ones get 503")
    group.add_argument("--timeout-keep-alive", type=float, default=DEFAULT_TIMEOUT_KEEP_ALIVE_S,
                       help="seconds an idle keep-alive connection stays open; keep it above "
                            "the idle timeout of the clients and proxies in front")
    group.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                       help="of the server's and the engine's logs")
    group.add_argument("--disable-access-log", action="store_true",
                       help="no log line per request (id, status, timings)")
    group.add_argument("--log-requests", action="store_true",
                       help="also log each generation request's body: prompts and parameters")
    group.add_argument("--enable-fault-injection", action="store_true",
                       help="testing only: honour the X-Tova-Fault request header "
                            "(docs/reliability.md); never in production")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with "(default: X)"; one whose help already says "default"
    (a None default, in words: what None means) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tova-serve",
        description="OpenAI-compatible server with a fixed-size TOVA key/value state.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _engine_arguments(parser)
    _server_arguments(parser)
    return parser


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerSettings]:
    """Raises ValueError (naming the setting) for invalid values."""
    fields = {name: getattr(args, name) for name in DEFAULTS if hasattr(args, name)}
    if fields.get("cuda_graph_batch_sizes") is not None:
        fields["cuda_graph_batch_sizes"] = tuple(fields["cuda_graph_batch_sizes"])
    engine = EngineConfig(**fields)
    server = ServerSettings(
        served_model_names=tuple(args.served_model_name or ()), api_key=args.api_key,
        protect_metrics=args.protect_metrics, max_queue_len=args.max_queue_len,
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout_s=args.shutdown_timeout, access_log=not args.disable_access_log,
        timeout_keep_alive_s=args.timeout_keep_alive,
        log_requests=args.log_requests, enable_fault_injection=args.enable_fault_injection,
        reasoning_parser=args.reasoning_parser,
        chat_template=None if args.chat_template is None else load_chat_template(
            args.chat_template),
    )
    return engine, server


def log_resolved(engine: AsyncEngine, settings: ServerSettings,
                 args: argparse.Namespace) -> None:
    info = engine.info
    config = engine.config  # as the core resolved it (max_num_seqs "auto" -> a number)
    resolved = {
        **dataclasses.asdict(config),
        "dtype": info.dtype,
        "device": info.device,
        "max_model_len": info.max_model_len,
        "max_num_batched_tokens": config.batched_token_budget,
        "served_model_names": list(settings.served_model_names or (info.model_name,)),
        "host": args.host, "port": args.port,
        "api_key": "set" if settings.api_key else None,
        "protect_metrics": settings.protect_metrics,
        "max_queue_len": settings.max_queue_len,
        "max_request_body_bytes": settings.max_request_body_bytes,
        "shutdown_timeout_s": settings.shutdown_timeout_s,
        "timeout_keep_alive_s": settings.timeout_keep_alive_s,
        "access_log": settings.access_log,
        "log_requests": settings.log_requests,
        "enable_fault_injection": settings.enable_fault_injection,
        "chat_template": "given" if settings.chat_template is not None else None,
    }
    logger.info("resolved config: %s", json.dumps(resolved))
    logger.info("state memory: %.2f MiB per request, %.2f MiB in total for %d slots",
                info.state_bytes_per_sequence / 2**20, info.state_total_bytes / 2**20,
                info.max_num_seqs)
    if settings.enable_fault_injection:
        logger.warning("fault injection is on: X-Tova-Fault headers can break requests and "
                       "kill the engine; this is for tests only")


def serve(engine: AsyncEngine, settings: ServerSettings, args: argparse.Namespace) -> None:
    app = create_app(engine, settings)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        # The app writes its own line per request (server.request_log), with ids and timings.
        access_log=False,
        # The drain (server.graceful) has already waited for in-flight requests.
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
        # Its timer never closes a connection whose next request has arrived (server.keepalive).
        http=KeepAliveProtocol, timeout_keep_alive=settings.timeout_keep_alive_s,
    )
    server = GracefulServer(config, app.state.context.drain, settings.shutdown_timeout_s)
    server.run()
    if not server.started:  # the port could not be bound; uvicorn has logged why
        sys.exit(3)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, settings = configs(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        logger.info("starting the engine core process (model %s)", config.model or "embedded")
        engine = AsyncEngine(config)
    except (ValueError, OSError) as exc:  # a model that cannot be found or read
        sys.exit(f"tova-serve: error: {exc}")
    log_resolved(engine, settings, args)
    try:
        serve(engine, settings, args)
    except ValueError as exc:  # a setting the app cannot honour for this model
        sys.exit(f"tova-serve: error: {exc}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
