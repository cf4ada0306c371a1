"""Request fields this server does not act on: OpenAI's that ask for nothing it does
(declared, their types checked: server/protocol/openai_fields.py) and fields nobody declared.

Like vLLM, a request is not refused for either: the first request that sets a field logs one
line naming it (per field and endpoint, not per request: a client that always sends it would
otherwise flood the log), and the request goes on. `--strict-request-fields` refuses fields
nobody declared instead (400 naming the field, OpenAI's message), for clients that want to
hear about a misspelt parameter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from pydantic import BaseModel

from server.http.errors import bad_request

logger = logging.getLogger("server")

_logged: set[tuple[str, str, str]] = set()  # (endpoint, "unknown" | "ignored", field path)
_lock = threading.Lock()


def unknown_fields(model: BaseModel, path: str = "") -> Iterator[str]:
    """Paths of the fields nobody declared, anywhere in the request ("messages.0.foo")."""
    for name in model.model_extra or {}:
        yield f"{path}{name}"
    for name in type(model).model_fields:
        yield from _walk(getattr(model, name), f"{path}{name}")


def _walk(value: object, path: str) -> Iterator[str]:
    if isinstance(value, BaseModel):
        yield from unknown_fields(value, f"{path}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}.{index}")


def check_request_fields(body: BaseModel, endpoint: str, strict: bool) -> None:
    """Refuse (strict) or log once and ignore the fields nobody declared; log once each
    declared OpenAI field the request sets that changes nothing here."""
    unknown = list(unknown_fields(body))
    if unknown and strict:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for path in unknown:
        _log_once(endpoint, "unknown", _pattern(path),
                  "%s: ignoring request field %r: neither OpenAI's nor this server's "
                  "(--strict-request-fields refuses such fields)")
    for name in getattr(type(body), "IGNORED", ()):
        if name in body.model_fields_set:
            _log_once(endpoint, "ignored", name,
                      "%s: request field %r is accepted and ignored: it asks for nothing this "
                      "server does (docs/serving.md, Request fields)")


def _pattern(path: str) -> str:
    """A path with its list indexes as "*": messages.0.foo and messages.3.foo log once."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _log_once(endpoint: str, kind: str, field: str, message: str) -> None:
    key = (endpoint, kind, field)
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.warning(message, endpoint, field)
