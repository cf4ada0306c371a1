"""Reading JSON values out of a model's text while it is still being written."""

from __future__ import annotations

import json
from typing import Any

_CLOSERS = {"{": "}", "[": "]"}


def json_end(text: str, start: int) -> int | None:
    """Where the object or array opening at `start` closes (the index after it), or None while
    it is still open. Only brackets and strings are followed: whether the value is valid JSON
    is for `json.loads` to say once it is whole."""
    expected: list[str] = []
    in_string = escaped = False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in _CLOSERS:
            expected.append(_CLOSERS[char])
        elif char in "}]":
            if not expected or expected.pop() != char:
                return position + 1  # unbalanced: whole, and json.loads refuses it
            if not expected:
                return position + 1
    return None


def loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return keep
    return 0
