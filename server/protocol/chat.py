"""POST /v1/chat/completions: request and response shapes (OpenAI + vLLM's extras)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.protocol.common import RequestPart, ResponseModel, SamplingFields, Usage
from server.protocol.openai_fields import ChatOpenAIFields
from server.protocol.schema import CONTENT, count
from server.protocol.tools import (
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
    ToolCallOut,
    ToolDefinition,
)


def _content_text(value: Any) -> str | None:
    """A message's content as one string: text parts are joined with newlines (as vLLM)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("content must be a string or a list of content parts")
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"only text content parts are supported (type 'text' with a 'text' string); "
                f"got {kind!r}"
            )
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(RequestPart):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | None, CONTENT] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str | None:
        return _content_text(value)

    @model_validator(mode="after")
    def _fields_by_role(self) -> ChatMessage:
        # OpenAI's schema: content may be left out only by an assistant message that calls
        # tools; calls belong to assistant messages, a call id to tool messages.
        def refuse(param: str, message: str) -> PydanticCustomError:
            return PydanticCustomError("message_fields", message, {"param": param})

        if self.tool_calls is not None and self.role != "assistant":
            raise refuse("tool_calls", "tool_calls belong to assistant messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise refuse("tool_call_id", "a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise refuse("tool_call_id", "tool_call_id belongs to tool messages")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise refuse("content", f"content is required for a {self.role} message"
                         + (" without tool_calls" if self.role == "assistant" else ""))
        return self

    def for_template(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {
                    "name": call.function.name,
                    "arguments": template_arguments(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def template_arguments(text: str) -> Any:
    """A call's arguments as templates expect them (an object where the text is JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class JsonSchemaFormat(RequestPart):
    """`response_format.json_schema` (OpenAI's): the schema the message content follows."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class ChatCompletionRequest(SamplingFields, ChatOpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int | None, count()] = None
    max_completion_tokens: Annotated[int | None, count()] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, count(0, 20)] = None
    # vLLM's chat extras.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # default true: several calls in one answer
    # OpenAI's deprecated function calling: declared so that it is refused by name.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None


class ChatLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"tool_calls", "reasoning_content"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None  # with --reasoning-parser: the model's thinking


class ChatChoice(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"state_positions"})

    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    state_positions: list[list[int]] | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(ResponseModel):
    # The first chunk of a choice carries the role, later ones only content.
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset(
        {"role", "content", "tool_calls", "reasoning_content"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None


class ChatStreamChoice(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"stop_reason", "state_positions"})

    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    state_positions: list[list[int]] | None = None


class ChatCompletionChunk(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
