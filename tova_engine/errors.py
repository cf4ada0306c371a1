"""The engine's errors. Bad input names its parameter as data, so a server maps it to its
own field without reading the message."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request (or a sampling parameter) the engine refuses. `param` is the engine's name
    for what was wrong ("temperature", "prompt", "state_size", ...), or None."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine core is not running; no request can be served now."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine (the engine and other requests go on)."""


class UnknownStateError(InvalidRequestError):
    """The stored state a request names does not exist (never saved, deleted or expired):
    a server answers 404."""
