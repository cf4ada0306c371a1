"""GET /health, /version and /metrics: open even when the API needs a key (/metrics can be
put behind it with `--protect-metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.http.errors import APIError
from server.http.openapi import json_responses
from server.protocol.common import ErrorResponse
from server.protocol.system import HealthResponse, ReadyResponse, VersionResponse
from server.serving.context import get_context
from server.serving.respond import json_response
from tova_engine import __version__

router = APIRouter()

_METRICS_RESPONSES = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "Prometheus text format"},
    401: {"model": ErrorResponse, "description": "With `--protect-metrics`: no or a wrong key"},
}


@router.get("/health", responses=json_responses(HealthResponse))
async def health(request: Request) -> Response:
    """Liveness: 200 while this server can serve, now or once its engine core has restarted
    (status "restarting"); 503 once the core will not come back (restarts exhausted): then
    the process should be replaced."""
    engine = get_context(request).engine
    if engine.dead_reason is not None:
        return APIError(503, f"the engine is not running: {engine.dead_reason}",
                        code="engine_dead").response()
    status = "ok" if engine.is_ready else "restarting"
    return json_response(HealthResponse(status=status, engine_restarts=engine.restarts))


@router.get("/ready", responses=json_responses(ReadyResponse))
async def ready(request: Request) -> Response:
    """Readiness: 200 only when the model is loaded, the engine core is running and the
    server is not draining; otherwise 503 (send traffic elsewhere for now)."""
    ctx = get_context(request)
    if ctx.drain.draining:
        return APIError(503, "the server is shutting down", code="draining").response()
    if not ctx.engine.is_ready:
        why = ctx.engine.dead_reason or "the engine core is restarting"
        return APIError(503, f"not ready: {why}", code="engine_not_ready").response()
    return json_response(ReadyResponse())


@router.get("/version", responses=json_responses(VersionResponse))
async def version() -> Response:
    return json_response(VersionResponse(version=__version__))


@router.get("/metrics", responses=_METRICS_RESPONSES)
async def metrics(request: Request) -> Response:
    body, content_type = get_context(request).metrics.render()
    return Response(body, media_type=content_type)
