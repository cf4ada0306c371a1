"""POST /v1/completions: request and response shapes (OpenAI's legacy completions + vLLM)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from server.protocol.common import ResponseModel, SamplingFields, Usage
from server.protocol.fields import normalize_prompt
from server.protocol.schema import PROMPT, count


class CompletionRequest(SamplingFields):
    prompt: Annotated[list[str | list[int]], PROMPT]
    # OpenAI's default; null means "up to the model's length limit", as in vLLM.
    max_tokens: Annotated[int | None, count()] = 16
    echo: bool = False
    logprobs: Annotated[int | None, count(0, 20)] = None
    # Declared so that they are refused by name (see `server.serving.sampling`), not as unknown.
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        return normalize_prompt(value)


class CompletionLogprobs(ResponseModel):
    """The legacy format: parallel lists, one entry per token of the returned text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    # Character offset of each token in the choice's text (which includes the prompt on echo).
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"state_positions"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's extra: the stop string or stop token id that ended the choice.
    stop_reason: str | int | None = None
    # Ours, with return_state: per layer, the absolute positions the state kept.
    state_positions: list[list[int]] | None = None


class CompletionResponse(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    # Always set on full responses; on stream chunks only with stream_options.include_usage.
    usage: Usage | None = None
