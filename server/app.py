"""The app factory: one FastAPI app around one running AsyncEngine."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from server.http.admission import Admission
from server.http.auth import APIKeyMiddleware
from server.http.body_limit import BodyLimitMiddleware
from server.http.drain import Drain, DrainMiddleware
from server.http.errors import install_error_handlers
from server.http.openapi import install_openapi
from server.http.request_log import RequestLogMiddleware
from server.http.route_metrics import HTTPMetricsMiddleware
from server.metrics import ServerMetrics
from server.metrics.saved_states import SavedStatesCollector
from server.routes import chat, completions, models, system, tokenize
from server.routes import responses as responses_route
from server.serving.context import ServerContext
from server.serving.responses_store import ResponseStore
from server.settings import ServerSettings
from tova_engine import AsyncEngine, __version__


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """The caller owns the engine (and shuts it down after the server stops)."""
    settings = settings or ServerSettings()
    info = engine.info
    if settings.chat_template is not None:
        if engine.tokenizer is None:
            raise ValueError("chat_template needs a tokenizer, and this model has none")
        engine.tokenizer.chat_template = settings.chat_template
    names = settings.served_model_names or (info.model_name,)
    metrics = _metrics(engine, names[0])
    # This front end's requests: with several front ends, each admits against its own.
    admission = Admission(lambda: engine.num_running, settings.max_queue_len,
                          settings.retry_after_s, on_change=metrics.refresh_waiting)
    metrics.bind_gauges(stats=lambda: engine.last_stats, waiting=admission.waiting,
                        slots_total=info.max_num_seqs, memory_bytes=info.state_total_bytes)
    metrics.set_sequence_bytes(info.state_bytes_by_layer_kind, info.state_bytes_saved_per_sequence)
    metrics.bind_prefix_cache(info.prefix_cache_rows, info.prefix_cache_bytes)
    app = FastAPI(title="tova-server", version=__version__)
    store_dir = engine.config.state_store_dir
    responses = ResponseStore(settings.responses_dir or (
        None if store_dir is None else Path(store_dir) / "responses"))
    app.state.context = ServerContext(engine, settings, metrics, admission, names, Drain(),
                                      responses)
    install_error_handlers(app)
    install_openapi(app, names, {
        "n": info.max_num_seqs, "state_size": info.state_size,
        # A prompt has at least one token.
        "max_tokens": info.max_model_len - 1, "max_completion_tokens": info.max_model_len - 1,
        "max_output_tokens": info.max_model_len - 1,
    }, info.vocab_size)
    routers = [module.router
               for module in (completions, chat, responses_route, models, tokenize, system)]
    for router in routers:
        app.include_router(router)
    _add_middleware(app, settings, metrics, [route for r in routers for route in r.routes])
    return app


def _add_middleware(app: FastAPI, settings: ServerSettings, metrics: ServerMetrics,
                    routes: list) -> None:
    """Each one added wraps the ones before it, so they run in the reverse order: metrics,
    log line, drain (503), key (401), body size (413), then the route. An unauthorised
    client is refused before its body is read."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key,
                           protect_metrics=settings.protect_metrics)
    app.add_middleware(DrainMiddleware, drain=app.state.context.drain)
    app.add_middleware(RequestLogMiddleware, enabled=settings.access_log)
    # Outermost: it also counts the 401s, 413s and 503s sent before any route.
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, routes=routes)


def _metrics(engine: AsyncEngine, model_name: str) -> ServerMetrics:
    info = engine.info
    # Every front end hears every step; the first counts the engine's figures.
    metrics = ServerMetrics(model_name, info.max_model_len, info.max_num_seqs,
                            observes_engine=engine.client_index == 0)
    metrics.set_engine_info(
        policy=info.policy, state_size=info.state_size, max_num_seqs=info.max_num_seqs,
        dtype=info.dtype, device=info.device, quantization=info.quantization,
        kv_cache_dtype=info.kv_cache_dtype,
    )
    engine.on_stats(metrics.observe_step)
    metrics.register_local(SavedStatesCollector(engine, model_name))
    engine.on_restart(metrics.count_engine_restart)
    return metrics
