"""Serving one app: the resolved configuration logged once, then uvicorn with the drain in
front of its shutdown (one front end, or each of several: server/api_servers.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
from typing import Any

import uvicorn

from server.app import create_app
from server.http.graceful import FLUSH_TIMEOUT_S, GracefulServer
from server.http.keepalive import KeepAliveProtocol
from server.settings import ServerSettings
from tova_engine import AsyncEngine

logger = logging.getLogger("server")


def _logged(settings: Any) -> dict[str, Any]:
    """The fields' values for the log, each `log_as` field as its word (or None when unset)."""
    values = dataclasses.asdict(settings)
    for field in dataclasses.fields(settings):
        word = field.metadata.get("log_as")
        if word is not None and values[field.name] is not None:
            values[field.name] = word
    return values


def log_resolved(engine: AsyncEngine, settings: ServerSettings) -> None:
    info = engine.info
    config = engine.config  # as the core resolved it (max_num_seqs "auto" -> a number)
    resolved = {
        **_logged(config),
        "dtype": info.dtype,
        "device": info.device,
        "max_model_len": info.max_model_len,
        "max_num_batched_tokens": config.batched_token_budget,
        **_logged(settings),
        "served_model_names": list(settings.served_model_names or (info.model_name,)),
    }
    logger.info("resolved config: %s", json.dumps(resolved))
    logger.info("state memory: %.2f MiB per request, %.2f MiB in total for %d slots",
                info.state_bytes_per_sequence / 2**20, info.state_total_bytes / 2**20,
                info.max_num_seqs)
    if settings.enable_fault_injection:
        logger.warning("fault injection is on: X-Tova-Fault headers can break requests and "
                       "kill the engine; this is for tests only")


def serve(engine: AsyncEngine, settings: ServerSettings,
          sockets: list[socket.socket] | None = None) -> None:
    """sockets: listen on these (already bound: several front ends share one) instead of
    binding host:port."""
    app = create_app(engine, settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        # The app writes its own line per request (server/http/request_log.py), with ids and
        # timings.
        access_log=False,
        # The drain (server/http/graceful.py) has already waited for in-flight requests.
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
        # Its timer never closes a connection whose next request has arrived
        # (server/http/keepalive.py).
        http=KeepAliveProtocol, timeout_keep_alive=settings.timeout_keep_alive_s,
    )
    server = GracefulServer(config, app.state.context.drain, settings.shutdown_timeout_s)
    server.run(sockets=sockets)
    if not server.started:  # the port could not be bound; uvicorn has logged why
        sys.exit(3)
