"""Settings of the HTTP layer (the engine's live in `tova_engine.EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSettings:
    # Names clients may put in `model`; the first is the one responses report by default.
    # Empty: the engine's model name.
    served_model_names: tuple[str, ...] = ()
    # Bearer token required on /v1/*; None leaves the API open.
    api_key: str | None = None
    # Requests allowed to wait for a slot; beyond it new ones get 429. None: unbounded.
    max_queue_len: int | None = None
    # Seconds a refused client is told to wait before retrying.
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_queue_len is not None and (
            not isinstance(self.max_queue_len, int) or self.max_queue_len < 1
        ):
            raise ValueError(f"max_queue_len must be an integer >= 1; got {self.max_queue_len!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if any(not name for name in self.served_model_names):
            raise ValueError("served model names must not be empty")
