"""Request strings must be valid Unicode.

JSON may spell a lone UTF-16 surrogate as an escape ("\\ud800"); Python's parser accepts it, but
such a string cannot be encoded as UTF-8: the tokenizer raises TypeError on it and a response
that repeated it could not be serialised. The whole body is checked once, before validation.
"""

from __future__ import annotations

from typing import Any


def _valid(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate_path(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Where in a parsed JSON value the first invalid string (or object key) is; None if
    there is none. The path is of keys and list indices, as an error's `param` names them."""
    if isinstance(value, str):
        return None if _valid(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            key_text = str(key)
            if not _valid(key_text):
                return (*path, key_text)
            found = lone_surrogate_path(item, (*path, key_text))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_path(item, (*path, str(index)))
            if found is not None:
                return found
    return None
