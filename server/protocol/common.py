"""Pieces shared by the completions and chat protocols: sampling fields, usage, errors.

Responses are serialised with `exclude_unset=True` (see `ResponseModel`): every field appears,
null included, as OpenAI's do, except the few listed in `_omit_unless_set` (extras such as
`state_positions`, a stream chunk's `usage`), which appear only when a builder sets them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.protocol.fields import normalize_logit_bias, normalize_stop, normalize_token_ids
from server.protocol.schema import LOGIT_BIAS, STOP, TOKEN_IDS, count, number
from server.protocol.unicode import lone_surrogate_path


class RequestPart(BaseModel):
    # Unknown fields are kept aside (`model_extra`): the route refuses them under
    # --strict-request-fields and otherwise logs and ignores them, as vLLM does
    # (server/http/request_fields.py).
    model_config = ConfigDict(extra="allow")


class RequestModel(RequestPart):
    """A whole request body: its strings are checked for lone surrogates before anything
    else reads them (see `server.protocol.unicode`)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = lone_surrogate_path(data)
        if path is not None:
            # Escaped, so that the error itself is valid UTF-8.
            param = ".".join(path).encode("utf-8", "backslashreplace").decode("utf-8")
            raise PydanticCustomError(
                "lone_surrogate",
                "{where} must be valid Unicode text: it holds a lone UTF-16 surrogate",
                {"where": param or "the request body", "param": param or None},
            )
        return data


class ResponseModel(BaseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset()

    def model_post_init(self, context: Any) -> None:
        # Mark the always-present fields as set so that exclude_unset keeps them.
        self.model_fields_set.update(type(self).model_fields.keys() - self._omit_unless_set)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


class StreamOptions(RequestPart):
    include_usage: bool = False


class StructuredOutputsField(RequestPart):
    """`structured_outputs` (vLLM's): exactly one constraint on the output. A kind of
    constraint not known here is refused, never ignored: the output would be unconstrained."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # vLLM's: JSON without free whitespace (compact). Default: the server's setting.
    disable_any_whitespace: bool | None = None


class SamplingFields(RequestModel):
    """Fields every generation endpoint takes: OpenAI's, vLLM's extras and ours."""

    model: str | None = None
    n: Annotated[int | None, count(1)] = 1
    temperature: Annotated[float | None, number(0)] = None
    top_p: Annotated[float | None, number(maximum=1, above=0)] = None
    stop: Annotated[list[str] | None, STOP] = None
    seed: int | None = None
    presence_penalty: Annotated[float | None, number(-2, 2)] = None
    frequency_penalty: Annotated[float | None, number(-2, 2)] = None
    logit_bias: Annotated[dict[int, float] | None, LOGIT_BIAS] = None
    # An end-user id for abuse tracing at OpenAI; accepted and not used.
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extras.
    top_k: Annotated[int | None, count(-1)] = None
    min_p: Annotated[float | None, number(0, 1)] = None
    repetition_penalty: Annotated[float | None, number(0.01)] = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, count(nullable=False)] = 0
    stop_token_ids: Annotated[list[int] | None, TOKEN_IDS] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Logprobs name tokens "token_id:N" instead of by text (exact for scoring harnesses).
    return_tokens_as_token_ids: bool = False
    # Ours: a smaller state for this request (up to the server's) and the positions it kept.
    state_size: Annotated[int | None, count(1)] = None
    return_state: bool = False
    # The latest positions this request's state never evicts: a count, or a fraction of its
    # state size (None: the server's --protect-recent).
    protect_recent: int | float | None = None
    # Structured outputs, vLLM's shapes: the newer object, and the older guided_* fields.
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

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


class PromptTokensDetails(ResponseModel):
    # Prompt tokens whose state the prefix cache restored instead of prefilling them.
    cached_tokens: int


class StateDetails(ResponseModel):
    """Ours: what the bounded state did to the request (server/serving/state_usage.py)."""

    state_size: int  # entries per layer the request's state held at most
    prompt_tokens_evicted: int  # prompt tokens the state no longer held once it had read them
    tokens_evicted: int  # all tokens dropped by the end, summed over the choices


class Usage(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"state_details"})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Always present, 0 when nothing was cached (as OpenAI's).
    prompt_tokens_details: PromptTokensDetails
    state_details: StateDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
           state: StateDetails | None = None) -> Usage:
        usage = cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )
        if state is not None:
            usage.state_details = state
        return usage


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
