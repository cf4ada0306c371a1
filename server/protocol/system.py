"""GET /health and /version bodies."""

from __future__ import annotations

from typing import Literal

from server.protocol.common import ResponseModel


class HealthResponse(ResponseModel):
    # "restarting": the engine core died and is being started again; the process is alive.
    status: Literal["ok", "restarting"] = "ok"
    engine_restarts: int = 0


class ReadyResponse(ResponseModel):
    status: Literal["ready"] = "ready"


class VersionResponse(ResponseModel):
    version: str
