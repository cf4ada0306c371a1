"""Pieces shared by the completions and chat protocols: sampling fields, usage, errors.

Responses are serialised with `exclude_unset=True` (see `ResponseModel`): every field appears,
null included, as OpenAI's do, except the few listed in `_omit_unless_set` (extras such as
`state_positions`, a stream chunk's `usage`), which appear only when a builder sets them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

from server.protocol.fields import normalize_logit_bias, normalize_stop, normalize_token_ids


class StrictModel(BaseModel):
    # Unknown fields are refused (400 naming the field), never silently ignored.
    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset()

    def model_post_init(self, context: Any) -> None:
        # Mark the always-present fields as set so that exclude_unset keeps them.
        self.model_fields_set.update(type(self).model_fields.keys() - self._omit_unless_set)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Fields every generation endpoint takes: OpenAI's, vLLM's extras and ours."""

    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    # An end-user id for abuse tracing at OpenAI; accepted and not used.
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Logprobs name tokens "token_id:N" instead of by text (exact for scoring harnesses).
    return_tokens_as_token_ids: bool = False
    # Ours: a smaller state for this request (up to the server's) and the positions it kept.
    state_size: int | None = None
    return_state: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str] | None:
        return normalize_stop(value)

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_token_ids(cls, value: Any) -> list[int] | None:
        return normalize_token_ids("stop_token_ids", value)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> dict[int, float] | None:
        return normalize_logit_bias(value)

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
