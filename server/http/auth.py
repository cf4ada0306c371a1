"""Bearer-token check on /v1/* (and /metrics with `--protect-metrics`); /health, /version and
the tokenizer stay open (the tokenizer endpoints are outside /v1, as in vLLM)."""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.http.errors import APIError

PROTECTED_PREFIX = "/v1"
METRICS_PATH = "/metrics"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, protect_metrics: bool = False) -> None:
        self.app = app
        self._expected = _digest(api_key.encode())
        self._protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protected(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)

    def _protected(self, path: str) -> bool:
        if self._protect_metrics and path == METRICS_PATH:
            return True
        return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # Constant time, and over digests of equal length: the comparison reveals
                # neither how much of a guess matched nor how long the key is.
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    _digest(token.strip()), self._expected)
        return False


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
