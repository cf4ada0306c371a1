"""GET /health, /version and /metrics: open even when the API needs a key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from server.context import get_context
from server.errors import APIError
from tova_engine import __version__

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine loop runs, 503 once it has stopped (a load balancer's signal to
    take this replica out)."""
    ctx = get_context(request)
    if not ctx.engine.is_running:
        return APIError(503, "the engine loop is not running", code="engine_dead").response()
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> Response:
    return JSONResponse({"version": __version__})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = get_context(request).metrics.render()
    return Response(body, media_type=content_type)
