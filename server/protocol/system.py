"""GET /health and /version bodies."""

from __future__ import annotations

from typing import Literal

from server.protocol.common import ResponseModel


class HealthResponse(ResponseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(ResponseModel):
    version: str
