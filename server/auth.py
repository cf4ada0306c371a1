"""Bearer-token check on /v1/*; /health, /metrics, /version and the tokenizer stay open
(the tokenizer endpoints are outside /v1, as in vLLM)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                # Constant time: the comparison must not reveal how much of a guess matched.
                return hmac.compare_digest(value, self._expected)
        return False


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
