"""GET /health, /version and /metrics: open even when the API needs a key (/metrics can be
put behind it with `--protect-metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.context import get_context
from server.errors import APIError
from server.openapi import json_responses
from server.protocol.common import ErrorResponse
from server.protocol.system import HealthResponse, VersionResponse
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
    """200 while the engine loop runs, 503 once it has stopped (a load balancer's signal to
    take this replica out)."""
    ctx = get_context(request)
    if not ctx.engine.is_running:
        return APIError(503, "the engine loop is not running", code="engine_dead").response()
    return json_response(HealthResponse())


@router.get("/version", responses=json_responses(VersionResponse))
async def version() -> Response:
    return json_response(VersionResponse(version=__version__))


@router.get("/metrics", responses=_METRICS_RESPONSES)
async def metrics(request: Request) -> Response:
    body, content_type = get_context(request).metrics.render()
    return Response(body, media_type=content_type)
