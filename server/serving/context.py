"""What every route needs: the engine, the settings, metrics, the queue limit and the drain."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from server.http.admission import Admission
from server.http.drain import Drain
from server.http.errors import APIError
from server.metrics import ServerMetrics
from server.serving.responses_store import ResponseStore
from server.serving.state_usage import StateBudget
from server.serving.tool_calls.parser import ToolCallParser
from server.serving.tool_calls.registry import tool_parser
from server.settings import ServerSettings
from tova_engine import AsyncEngine


@dataclass(slots=True)
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    admission: Admission
    served_model_names: tuple[str, ...]
    drain: Drain
    responses: ResponseStore = field(default_factory=ResponseStore)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.info.vocab_size

    @property
    def tool_parser(self) -> ToolCallParser:
        """How this model writes tool calls (`--tool-call-parser`, or its template's)."""
        return tool_parser(self.settings.tool_call_parser, self.tokenizer)

    def state_budget(self, requested: int | None) -> StateBudget:
        """A request's state size (its own or the server's) and whether the policy evicts."""
        info = self.engine.info
        return StateBudget.of(requested, info.state_size, info.policy_evicts)

    def resolve_model(self, requested: str | None) -> str:
        """The name responses report; 404 for a model this server does not serve."""
        if requested is None:
            return self.model_name
        if requested not in self.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", "model",
                           "model_not_found")
        return requested

    def require_engine(self) -> None:
        if not self.engine.is_ready:
            raise APIError(503, "the engine is not running; the server cannot serve requests",
                           code="engine_dead")


def get_context(request: Request) -> ServerContext:
    return request.app.state.context
