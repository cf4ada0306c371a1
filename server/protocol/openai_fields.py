"""Fields of OpenAI's request schemas that ask for nothing this server does (billing, storage
on OpenAI's side, tools it hosts, audio): accepted with their types checked, and ignored.
`IGNORED` names them; the route logs each the first time a request sets it
(server/http/request_fields.py). docs/serving.md lists them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from server.protocol.common import RequestPart

ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]
Metadata = Annotated[dict[str, str] | None, Field(max_length=16)]


class ChatOpenAIFields(RequestPart):
    """Chat Completions' fields that change nothing here."""

    store: bool | None = None  # OpenAI keeps the completion for its dashboard
    metadata: Metadata = None  # tags for OpenAI's dashboard
    service_tier: ServiceTier | None = None  # OpenAI's processing tiers
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_key: str | None = None  # OpenAI's cache routing (the prefix cache is automatic)
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None  # an end-user id for OpenAI's abuse checks
    modalities: list[Literal["text", "audio"]] | None = None  # text is what comes back
    audio: dict[str, Any] | None = None  # refused: spoken output would be dropped unsaid
    prediction: dict[str, Any] | None = None  # predicted outputs (a speed hint)
    web_search_options: dict[str, Any] | None = None  # OpenAI's hosted search

    IGNORED: ClassVar[tuple[str, ...]] = (
        "store", "metadata", "service_tier", "reasoning_effort", "verbosity", "prompt_cache_key",
        "prompt_cache_retention", "safety_identifier", "modalities", "prediction",
        "web_search_options", "user")

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("audio output is not supported: this server answers in text")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "audio" in value:
            raise ValueError("modalities: only 'text' is supported")
        return value


class ResponsesOpenAIFields(RequestPart):
    """The Responses API's fields that change nothing here."""

    background: bool | None = None  # this server answers in the foreground
    include: list[str] | None = None  # extra output items (none of them produced here)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    service_tier: ServiceTier | None = None
    reasoning: dict[str, Any] | None = None  # effort and summary settings
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    stream_options: dict[str, Any] | None = None

    IGNORED: ClassVar[tuple[str, ...]] = (
        "background", "include", "prompt_cache_key", "prompt_cache_retention",
        "safety_identifier", "service_tier", "reasoning", "top_logprobs", "stream_options",
        "user")
