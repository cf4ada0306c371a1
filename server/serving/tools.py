"""Tool calling: the request's tools checked, shown to the model, and its calls read back.

The model's chat template renders the tools when it knows them (a template that reads
`tools`); otherwise a system message lists them (as JSON Schema) and asks for calls in the
`<tool_call>` format many tool-trained models use:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

and earlier calls and tool results in the history are written that way too (results as
`<tool_response>` user turns). With `tool_choice` "required" or a named function the output
is constrained to such calls (an llguidance grammar whose call bodies follow each function's
parameter schema), so it always parses; with "auto" the model chooses and the server parses
what it wrote; with "none" the tools are not shown and nothing is parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from server.http.errors import bad_request
from server.protocol.chat import ChatCompletionRequest, ChatMessage
from server.protocol.tools import NamedToolChoice, ToolCallOut, ToolDefinition
from tova_engine import InvalidRequestError
from tova_engine.structured import StructuredOutputs

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[ToolDefinition]
    choice: str  # "auto", "required" or "named" ("none" makes no plan)
    parallel: bool
    named: str | None = None

    @property
    def constraint(self) -> StructuredOutputs | None:
        """The grammar that holds "required" and named choices to well-formed calls."""
        if self.choice == "auto":
            return None
        functions = [t.function for t in self.tools
                     if self.named is None or t.function.name == self.named]
        bodies = [{"type": "object",
                   "properties": {"name": {"const": f.name},
                                  "arguments": f.parameters or _NO_ARGUMENTS},
                   "required": ["name", "arguments"], "additionalProperties": False}
                  for f in functions]
        body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
        repeat = ' ("\\n" call)*' if self.parallel and self.named is None else ""
        return StructuredOutputs(grammar=(
            f"start: call{repeat}\n"
            f'call: "{CALL_OPEN}" body "{CALL_CLOSE}"\n'
            f"body: %json {json.dumps(body)}\n"))

    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}


def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """Checks tools, tool_choice and the history's tool messages (400 naming the field);
    None when no call can come back (no tools, or tool_choice "none")."""
    _check_history(body.messages)
    tools, choice = body.tools or [], body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            raise bad_request(f"tools: two functions are named {name!r}",
                              f"tools.{i}.function.name")
        seen.add(name)
        _check_parameters(tool.function.parameters, i)
    if choice == "none":
        return None
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in seen:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among "
                              "the tools", "tool_choice")
        return ToolPlan(tools, "named", parallel, choice.function.name)
    return ToolPlan(tools, choice or "auto", parallel)


def _check_parameters(parameters: dict[str, Any] | None, index: int) -> None:
    if parameters is None:
        return
    param = f"tools.{index}.function.parameters"
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{param}: a function's parameters are a JSON Schema of an object",
                          param)
    try:
        StructuredOutputs(json=parameters).to_grammar()
    except InvalidRequestError as exc:
        raise bad_request(f"{param}: {exc}", param) from None


def _check_history(messages: list[ChatMessage]) -> None:
    """Every tool message answers a call made by an earlier assistant message."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.tool_calls or ():
            calls.add(call.id)
        if message.role == "tool" and message.tool_call_id not in calls:
            raise bad_request(f"messages.{i}.tool_call_id: {message.tool_call_id!r} answers no "
                              "earlier assistant tool call", f"messages.{i}.tool_call_id")


def template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render_messages(messages: list[ChatMessage], plan: ToolPlan | None,
                    native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the template, the `tools` argument for a template that takes it)."""
    rendered = [m.for_template() for m in messages]
    tools = None if plan is None else [t.model_dump(exclude_none=True) for t in plan.tools]
    if native:
        return rendered, tools
    rendered = [_plain(message) for message in rendered]
    if tools:
        listing = _tool_prompt(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + listing}
        else:
            rendered.insert(0, {"role": "system", "content": listing})
    return rendered, None


def _tool_prompt(tools: list[dict[str, Any]]) -> str:
    functions = "\n".join(json.dumps(t["function"]) for t in tools)
    return ("You can call these functions (JSON Schema):\n" + functions + "\n\nTo call one, "
            "answer with nothing but one line per call:\n"
            f'{CALL_OPEN}{{"name": <function name>, "arguments": <arguments as a JSON '
            f"object>}}{CALL_CLOSE}\nThe results come back as <tool_response> messages.")


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message as a template that knows no tools can render it."""
    if message["role"] == "tool":
        return {"role": "user",
                "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    lines = [message["content"]] if message["content"] else []
    lines += [CALL_OPEN + json.dumps({"name": c["function"]["name"],
                                      "arguments": c["function"]["arguments"]}) + CALL_CLOSE
              for c in calls]
    return {"role": "assistant", "content": "\n".join(lines)}


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCallOut]]:
    """(the content around the calls, or None; the calls) from a finished output. A block
    that is not a call to a declared function stays in the content."""
    calls: list[ToolCallOut] = []
    kept: list[str] = []
    position = 0
    for match in _CALL.finditer(text):
        call = _call(match.group(1), names)
        if call is None:
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[position:])
    return "".join(kept).strip() or None, calls


def _call(body: str, names: set[str]) -> ToolCallOut | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the JSON as a string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}",
                       function={"name": value["name"], "arguments": json.dumps(arguments)})


def safe_prefix(text: str) -> int:
    """How much of a streamed text can go out as content: everything before a call opens,
    and before a tail that may be the start of one."""
    start = text.find(CALL_OPEN)
    if start >= 0:
        return start
    for keep in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
