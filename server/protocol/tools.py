"""Tool (function) calling shapes: the request's `tools` and `tool_choice`, an assistant
message's `tool_calls`, and the calls a response and its stream chunks carry (OpenAI's)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from server.protocol.common import RequestPart, ResponseModel

FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDefinition(RequestPart):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; none: no arguments
    strict: bool | None = None


class ToolDefinition(RequestPart):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestPart):
    name: str


class NamedToolChoice(RequestPart):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(RequestPart):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(RequestPart):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallOut(ResponseModel):
    name: str
    arguments: str


class ToolCallOut(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionCallDelta(ResponseModel):
    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"name"})

    name: str | None = None
    arguments: str = ""


class ToolCallDelta(ResponseModel):
    """A stream's piece of a call: the first names it (id, type, name), later ones add to
    `arguments`; the `openai` client joins them by `index`."""

    _omit_unless_set: ClassVar[frozenset[str]] = frozenset({"id", "type"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta
