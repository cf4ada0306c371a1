"""The OpenAPI schema at /openapi.json describes what the server really answers.

Routes declare their success body and the errors they can send (all in OpenAI's shape,
`ErrorResponse`); FastAPI's generated 422 ("Validation Error") is removed, since this server
never sends it (bad input is a 400). Schema-driven fuzzing (tests/test_reliability_schema.py)
generates requests from this document and checks every response against it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol.chat import ChatCompletionChunk
from server.protocol.common import ErrorResponse
from server.protocol.responses import ResponseStreamEvent
from server.protocol.schema import TOKEN_ID_MARK

_WHEN = {
    400: "Invalid input; `param` names the field",
    401: "Missing or wrong API key (with `--api-key`)",
    404: "Unknown model, or unknown (deleted, expired) response",
    413: "Request body over `--max-request-body-bytes`",
    429: "`--max-queue-len` requests already wait for a slot (`Retry-After` says when to retry)",
    500: "The request failed inside the engine",
    503: "The engine loop has stopped, or the server is shutting down",
}
# Every route but /metrics refuses requests while the server drains (server.http.drain).
_ALWAYS = (503,)
_WITH_BODY = (400, 413)
_UNUSED_SCHEMAS = ("HTTPValidationError", "ValidationError")
_COMPONENTS = "#/components/schemas/{model}"
# Stream chunks no route returns as a whole body, so FastAPI does not list them by itself.
_CHUNK_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, ResponseStreamEvent)

Responses = dict[int | str, dict[str, Any]]


def errors(*statuses: int) -> Responses:
    return {status: {"model": ErrorResponse, "description": _WHEN[status]}
            for status in sorted({*statuses, *_ALWAYS})}


def generation_responses(model: type[BaseModel], chunk: type[BaseModel]) -> Responses:
    """A JSON body, or with `stream: true` an event stream of `chunk`s."""
    streamed = {"text/event-stream": {"schema": _event(chunk)}}
    return {200: {"model": model, "content": streamed},
            **errors(*_WITH_BODY, 401, 404, 429, 500)}


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event: `data:` holds a chunk or an error (a failure after the stream
    started) as JSON, or the final `[DONE]`."""
    payload = {"anyOf": [{"$ref": _COMPONENTS.format(model=model.__name__)}
                         for model in (chunk, ErrorResponse)]}
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json", "contentSchema": payload}}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def body_responses(model: type[BaseModel], *statuses: int) -> Responses:
    """A JSON route that reads a request body."""
    return {200: {"model": model}, **errors(*_WITH_BODY, *statuses)}


def json_responses(model: type[BaseModel], *statuses: int) -> Responses:
    return {200: {"model": model}, **errors(*statuses)}


def install_openapi(app: FastAPI, served_model_names: tuple[str, ...],
                    limits: dict[str, int], vocab_size: int) -> None:
    """`limits`: request fields' maxima that only the running engine knows (`n` up to its
    slots, `max_tokens` up to its length limit, ...); token ids are below `vocab_size`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
            # A copy: field schemas are shared module constants, and are edited below.
            schema = json.loads(json.dumps(schema))
            _drop_validation_error(schema)
            _add_chunk_models(schema)
            _name_the_models(schema, served_model_names)
            _set_limits(schema, limits, vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _request_schemas(schema: dict[str, Any]) -> list[dict[str, Any]]:
    # Request bodies are the strict models: they refuse unknown fields.
    return [component for component in schema.get("components", {}).get("schemas", {}).values()
            if component.get("additionalProperties") is False]


def _set_limits(schema: dict[str, Any], limits: dict[str, int], vocab_size: int) -> None:
    for component in _request_schemas(schema):
        for name, field in component.get("properties", {}).items():
            _limit_token_ids(field, vocab_size - 1)
            if name not in limits:
                continue
            for branch in field.get("anyOf", [field]):
                if branch.get("type") == "integer":
                    branch["maximum"] = limits[name]


def _limit_token_ids(node: Any, highest: int) -> None:
    if isinstance(node, dict):
        if node.get(TOKEN_ID_MARK):
            node["maximum"] = highest
        for value in node.values():
            _limit_token_ids(value, highest)
    elif isinstance(node, list):
        for value in node:
            _limit_token_ids(value, highest)


def _name_the_models(schema: dict[str, Any], names: tuple[str, ...]) -> None:
    """`model` in a request body takes only the served names (any other is a 404): known
    when the app is built, not when the models are declared."""
    for component in _request_schemas(schema):
        properties = component.get("properties", {})
        if "model" in properties:
            properties["model"] = {"anyOf": [{"enum": list(names)}, {"type": "null"}],
                                   "title": "Model", "description": "One of the served names"}


def _add_chunk_models(schema: dict[str, Any]) -> None:
    _, definitions = models_json_schema([(model, "serialization") for model in _CHUNK_MODELS],
                                        ref_template=_COMPONENTS)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in definitions.get("$defs", {}).items():
        components.setdefault(name, definition)


def _drop_validation_error(schema: dict[str, Any]) -> None:
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in _UNUSED_SCHEMAS:
        components.pop(name, None)
