"""POST /v1/responses: OpenAI's Responses API, text and function calls, with
`previous_response_id` continuing from the previous response's saved state."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from server.protocol.chat import _content_text, template_arguments
from server.protocol.common import RequestModel, RequestPart, ResponseModel
from server.protocol.openai_fields import ResponsesOpenAIFields
from server.protocol.schema import count, number
from server.protocol.tools import FUNCTION_NAME, FunctionDefinition, ToolDefinition


def _input_text(value: Any) -> Any:
    """Responses content parts are `input_text` (user, system) or `output_text` (assistant)."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text"):
                part = {**part, "type": "text"}
            parts.append(part)
        value = parts
    return _content_text(value)


def _text_of(value: Any, field: str) -> str:
    text = _input_text(value)
    if text is None:
        raise ValueError(f"{field} must be a string or a list of text parts")
    return text


class InputMessage(RequestPart):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    # Accepted as the client sends them back from an earlier output; not used.
    id: str | None = None
    status: str | None = None

    _content = field_validator("content", mode="before")(lambda value: _text_of(value,
                                                                               "content"))

    def for_template(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role,
                "content": self.content}


class FunctionCallItem(RequestPart):
    """A call the model made in an earlier turn, as the client sends it back."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str  # JSON text, as the model wrote it
    id: str | None = None
    status: str | None = None

    def for_template(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function",
                "function": {"name": self.name, "arguments": template_arguments(self.arguments)}}


class FunctionCallOutputItem(RequestPart):
    """A function's result, answering the call `call_id`."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str
    id: str | None = None
    status: str | None = None

    _output = field_validator("output", mode="before")(lambda value: _text_of(value, "output"))


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem
_ITEM_TYPES: dict[str | None, type[RequestPart]] = {
    None: InputMessage, "message": InputMessage, "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem}


_MESSAGE_SCHEMA = {
    "type": "object",
    "required": ["role", "content"],
    "additionalProperties": False,
    "properties": {
        "type": {"enum": ["message"]},
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [
            {"type": "string"},
            {"type": "array", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"enum": ["input_text", "output_text", "text"]},
                               "text": {"type": "string"}}}},
        ]},
        "id": {"type": "string"},
        "status": {"type": "string"},
    },
}
_TEXT_PARTS = {"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"enum": ["input_text", "output_text", "text"]},
                       "text": {"type": "string"}}}},
]}
_FUNCTION_CALL_SCHEMA = {
    "type": "object",
    "required": ["type", "call_id", "name", "arguments"],
    "additionalProperties": False,
    "properties": {"type": {"enum": ["function_call"]}, "call_id": {"type": "string",
                                                                     "minLength": 1},
                   "name": {"type": "string"}, "arguments": {"type": "string"},
                   "id": {"type": "string"}, "status": {"type": "string"}},
}
_FUNCTION_CALL_OUTPUT_SCHEMA = {
    "type": "object",
    "required": ["type", "call_id", "output"],
    "additionalProperties": False,
    "properties": {"type": {"enum": ["function_call_output"]},
                   "call_id": {"type": "string", "minLength": 1}, "output": _TEXT_PARTS,
                   "id": {"type": "string"}, "status": {"type": "string"}},
}
_INPUT_SCHEMA = {
    "anyOf": [{"type": "string", "minLength": 1},
              {"type": "array", "minItems": 1, "items": {"anyOf": [
                  _MESSAGE_SCHEMA, _FUNCTION_CALL_SCHEMA, _FUNCTION_CALL_OUTPUT_SCHEMA]}}],
    "description": "A user message as a string, or a list of items: messages, the model's "
                   "function calls and their outputs",
}


class ResponseObject(ResponseModel):
    """The Responses API object (the fields this server fills; see `serving.responses`)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ResponseStreamEvent(ResponseModel):
    """One event of a streamed response: `type` says which (response.created, ...)."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


class InputItemList(ResponseModel):
    """GET /v1/responses/{id}/input_items: one page of a stored response's input."""

    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(ResponseModel):
    id: str
    object: Literal["response"]
    deleted: bool


class TextFormat(RequestPart):
    """`text.format`: plain text, any JSON object, or JSON following a schema (the Responses
    API's flat shape: name, schema and strict beside the type)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format with type 'json_schema' needs a schema")
        return self


class TextOptions(RequestPart):
    """`text`: the output's format, and its verbosity (accepted and ignored)."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class FunctionTool(RequestPart):
    """A function the model may call (the Responses API's flat shape: name, parameters and
    strict beside the type)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def definition(self) -> ToolDefinition:
        """As chat's tools carry it."""
        return ToolDefinition(type="function", function=FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters,
            strict=self.strict))


class FunctionToolChoice(RequestPart):
    type: Literal["function"]
    name: str


class ResponsesRequest(RequestModel, ResponsesOpenAIFields):
    model: str | None = None
    # A string (one user message) or a list of messages; checked by `_input`, so that every
    # error about it names `input`.
    input: Annotated[Any, WithJsonSchema(_INPUT_SCHEMA)]
    instructions: str | None = None
    max_output_tokens: Annotated[int | None, count(1)] = None
    temperature: Annotated[float | None, number(0, 2)] = None
    top_p: Annotated[float | None, number(maximum=1, above=0)] = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: Annotated[dict[str, str] | None, Field(max_length=16)] = None
    user: str | None = None
    # Accepted when they ask for nothing this server would do differently.
    truncation: Literal["disabled"] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    tools: list[FunctionTool] | None = None
    max_tool_calls: Annotated[int | None, Field(ge=1), count(1)] = None  # calls per response
    text: TextOptions | None = None
    # OpenAI-hosted objects this server cannot load: refused by name, never dropped unread.
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    # This server's and vLLM's extras.
    state_size: Annotated[int | None, count(1)] = None
    seed: int | None = None
    top_k: Annotated[int | None, count(-1)] = None
    min_p: Annotated[float | None, number(0, 1)] = None
    presence_penalty: Annotated[float | None, number(-2, 2)] = None
    frequency_penalty: Annotated[float | None, number(-2, 2)] = None
    repetition_penalty: Annotated[float | None, number(0.01)] = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, count(nullable=False)] = 0

    @field_validator("prompt", "conversation")
    @classmethod
    def _hosted(cls, value: Any, info) -> Any:
        if value is not None:
            raise ValueError(
                f"{info.field_name} refers to an object stored at OpenAI, which this server "
                "cannot load; send the text itself (input, instructions) or continue with "
                "previous_response_id"
            )
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        for index, tool in enumerate(value or ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(
                    f"tools[{index}]: type {kind!r} is not supported: this server runs function "
                    "tools (type 'function'); hosted tools (web_search, file_search, ...) are "
                    "OpenAI's")
        return value

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> str | list[InputItem]:
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be empty")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("input must be a non-empty string or a non-empty list of items")
        items = []
        for index, item in enumerate(value):
            kind = item.get("type") if isinstance(item, dict) else None
            model = _ITEM_TYPES.get(kind)
            if model is None:
                raise ValueError(f"input[{index}].type: {kind!r} is not an input item this "
                                 "server reads (message, function_call, function_call_output)")
            try:
                items.append(model.model_validate(item))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(
                    f"input[{index}]{'.' + where if where else ''}: {first['msg']}") from None
        return items

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            if len(key) > 64 or len(text) > 512:
                raise ValueError("metadata keys are at most 64 characters, values 512")
        return value

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def stored(self) -> bool:
        """`store` as OpenAI reads it: null is the default, true."""
        return self.store is not False

    @property
    def items(self) -> list[InputItem]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [InputMessage(role="user", content=self.input)]
        return self.input

    def messages(self) -> list[dict[str, Any]]:
        """The new turn's messages for the chat template: instructions first (as a system
        message), then the input; function calls join the assistant message before them (or
        make one), outputs become tool messages."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        for item in self.items:
            if isinstance(item, FunctionCallItem):
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": ""})
                messages[-1].setdefault("tool_calls", []).append(item.for_template())
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id,
                                 "content": item.output})
            else:
                messages.append(item.for_template())
        return messages
