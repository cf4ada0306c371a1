"""Normalisers for request fields whose JSON shape varies (`prompt`, `stop`, `logit_bias`).

Each takes the raw JSON value and returns one canonical shape or raises ValueError with a
message that names the field: pydantic's own errors for unions list every branch tried,
which tells a client nothing.
"""

from __future__ import annotations

from typing import Any

# OpenAI caps logit_bias values at +-100; larger values add nothing after softmax anyway.
MAX_LOGIT_BIAS = 100.0


def is_token_id(value: Any) -> bool:
    """An integer >= 0, or an integral number such as 2.0 (JSON Schema counts it as an
    integer, and pydantic accepts it for every other integer field)."""
    # bool is an int subclass, but `true` in a token list is a client bug.
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_token_id(t) for t in value)


def _token_ids(values: list[Any]) -> list[int]:
    """Checked by `is_token_id`: 2.0 becomes 2."""
    return [int(value) for value in values]


def normalize_prompt(value: Any) -> list[str | list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a list of prompts, each text or ids."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists, and not empty"
        )
    if all(isinstance(p, str) for p in value):
        return list(value)
    if _is_token_list(value):
        return [_token_ids(value)]
    if all(_is_token_list(p) for p in value):
        return [_token_ids(p) for p in value]
    raise ValueError(
        "prompt must be a string, a list of strings, a list of token ids (integers >= 0) or "
        "a list of non-empty token-id lists; mixed or nested shapes are not accepted"
    )


def normalize_stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ValueError("stop must be a non-empty string or a list of non-empty strings")
    return list(items)


def normalize_token_ids(name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(is_token_id(t) for t in value):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0)")
    return _token_ids(value)


def normalize_logit_bias(value: Any) -> dict[int, float] | None:
    """{"token id": bias} as OpenAI sends it (JSON keys are strings) -> {id: bias}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("logit_bias must be an object mapping token ids to biases")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids; got {key!r}") from None
        if token < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0; got {key!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise ValueError(f"logit_bias values must be numbers; got {amount!r}")
        if not -MAX_LOGIT_BIAS <= amount <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-100, 100]; got {amount!r}")
        bias[token] = float(amount)
    return bias
