"""A request's tools checked (400 naming the field) and planned: which functions, how the
model must or may call them, with which parser, and when a choice has called enough."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.http.errors import bad_request
from server.protocol.chat import ChatCompletionRequest, ChatMessage
from server.protocol.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    ResponsesRequest,
)
from server.protocol.tools import NamedToolChoice, ToolDefinition
from server.serving.tool_calls.parser import ToolCallParser
from tova_engine import InvalidRequestError
from tova_engine.structured import StructuredOutputs


@dataclass(frozen=True)
class ToolPlan:
    tools: list[ToolDefinition]
    choice: str  # "auto", "required" or "named" ("none" makes no plan)
    parallel: bool
    parser: ToolCallParser
    named: str | None = None
    max_calls: int | None = None  # the Responses API's max_tool_calls

    @property
    def constraint(self) -> StructuredOutputs | None:
        """The grammar that holds "required" and named choices to well-formed calls in the
        parser's syntax (each call's arguments following its function's schema)."""
        if self.choice == "auto":
            return None
        bodies = [self.parser.call_body(t.function.name, t.function.parameters)
                  for t in self.tools if self.named is None or t.function.name == self.named]
        body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
        parallel = self.parallel and self.named is None
        return StructuredOutputs(grammar=self.parser.grammar("body", parallel)
                                 + f"body: %json {json.dumps(body)}\n")

    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    @property
    def call_limit(self) -> int | None:
        """How many calls a choice may make before its generation is stopped."""
        if not self.parallel:
            return 1
        return self.max_calls


def plan_tools(tools: list[ToolDefinition] | None, choice: str | None, named: str | None,
               parallel: bool | None, parser: ToolCallParser, function_path: str,
               max_calls: int | None = None) -> ToolPlan | None:
    """Checks the tools and tool_choice; None when no call can come back (no tools, or
    tool_choice "none"). choice: "none", "auto", "required" or None (auto), or "named" with
    the function's name in `named`. function_path: where a tool's function sits in the
    request, for error names ("tools.{}.function" in chat, "tools.{}" in the Responses API)."""
    tools = tools or []
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            raise bad_request(f"tools: two functions are named {name!r}",
                              function_path.format(i) + ".name")
        seen.add(name)
        _check_parameters(tool.function.parameters, function_path.format(i) + ".parameters")
    if choice == "none":
        return None
    parallel = parallel is not False
    if choice == "named":
        if named not in seen:
            raise bad_request(f"tool_choice names {named!r}, which is not among the tools",
                              "tool_choice")
        return ToolPlan(tools, "named", parallel, parser, named, max_calls)
    return ToolPlan(tools, choice or "auto", parallel, parser, max_calls=max_calls)


def _check_parameters(parameters: dict[str, Any] | None, param: str) -> None:
    if parameters is None:
        return
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{param}: a function's parameters are a JSON Schema of an object",
                          param)
    try:
        StructuredOutputs(json=parameters).to_grammar()
    except InvalidRequestError as exc:
        raise bad_request(f"{param}: {exc}", param) from None


def plan_chat_tools(body: ChatCompletionRequest, parser: ToolCallParser) -> ToolPlan | None:
    """A chat request's tools and tool_choice, and its history's tool messages checked."""
    _check_history(body.messages)
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    return plan_tools(body.tools, "named" if named is not None else choice, named,
                      body.parallel_tool_calls, parser, "tools.{}.function")


def _check_history(messages: list[ChatMessage]) -> None:
    """Every tool message answers a call made by an earlier assistant message."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.tool_calls or ():
            calls.add(call.id)
        if message.role == "tool" and message.tool_call_id not in calls:
            raise bad_request(f"messages.{i}.tool_call_id: {message.tool_call_id!r} answers no "
                              "earlier assistant tool call", f"messages.{i}.tool_call_id")


def plan_response_tools(body: ResponsesRequest, parser: ToolCallParser) -> ToolPlan | None:
    """A Responses request's tools, tool_choice, parallel_tool_calls and max_tool_calls."""
    choice = body.tool_choice
    if choice == "auto" and not body.tools:
        choice = None  # the Responses API's default, with or without tools (chat refuses it)
    named = choice.name if isinstance(choice, FunctionToolChoice) else None
    return plan_tools([tool.definition() for tool in body.tools or ()],
                      "named" if named is not None else choice, named,
                      body.parallel_tool_calls, parser, "tools.{}", body.max_tool_calls)


def check_call_outputs(body: ResponsesRequest, earlier_calls: set[str]) -> None:
    """Every function_call_output answers a call: one earlier in the input, or one the
    previous response made (`earlier_calls`)."""
    calls = set(earlier_calls)
    for i, item in enumerate(body.items):
        if isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem) and item.call_id not in calls:
            raise bad_request(
                f"input[{i}].call_id: {item.call_id!r} answers no function call of this input"
                + (" or of the previous response" if earlier_calls else ""),
                f"input.{i}.call_id")
