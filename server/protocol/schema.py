"""JSON schemas of request fields whose pydantic type says less than the server accepts.

Normalisers (`server.protocol.fields`) take more shapes than the declared Python types (a
prompt may be one string or a list of token ids), and the numeric ranges are checked by
`SamplingParams`, not pydantic. These annotations make /openapi.json say what the server
really takes, so clients and schema-driven test generators see the true contract. They
change the schema only, never validation.
"""

from __future__ import annotations

from typing import Any

from pydantic import WithJsonSchema

_NULL = {"type": "null"}
# Marked, so that the app can add the vocabulary's size as the maximum (server.http.openapi).
TOKEN_ID_MARK = "x-token-id"
_TOKEN_ID = {"type": "integer", "minimum": 0, TOKEN_ID_MARK: True}
_TOKEN_IDS = {"type": "array", "items": _TOKEN_ID, "minItems": 1}
_TEXT_PART = {
    "type": "object", "required": ["type", "text"], "additionalProperties": False,
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}


def schema(body: dict[str, Any], nullable: bool = True) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [body, _NULL]} if nullable else body)


def number(minimum: float | None = None, maximum: float | None = None, *,
           above: float | None = None, integer: bool = False,
           nullable: bool = True) -> WithJsonSchema:
    """A number (or integer) in [minimum, maximum], or above `above` (exclusive)."""
    body: dict[str, Any] = {"type": "integer" if integer else "number"}
    bounds = {"minimum": minimum, "maximum": maximum, "exclusiveMinimum": above}
    body.update({name: value for name, value in bounds.items() if value is not None})
    return schema(body, nullable)


def count(minimum: int = 0, maximum: int | None = None, nullable: bool = True) -> WithJsonSchema:
    return number(minimum, maximum, integer=True, nullable=nullable)


PROMPT = schema({"oneOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
]}, nullable=False)
STOP = schema({"oneOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}},
]})
TOKEN_IDS = schema({"type": "array", "items": _TOKEN_ID})
REQUIRED_TOKEN_IDS = schema({"type": "array", "items": _TOKEN_ID}, nullable=False)
LOGIT_BIAS = schema({
    "type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
})
CONTENT = schema({"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]})
