"""The conversation as the chat template gets it when tools are in play.

A template that reads `tools` renders them itself, and the history's calls and results as
it expects them. For one that knows no tools, a system message lists the functions (as JSON
Schema) with the parser's instructions, earlier calls are written in the assistant turns in
the parser's syntax, and results become `<tool_response>` user turns.
"""

from __future__ import annotations

import json
from typing import Any

from server.serving.tool_calls.parser import ToolCallParser
from server.serving.tool_calls.plan import ToolPlan


def template_knows_tools(tokenizer: Any) -> bool:
    return "tools" in str(getattr(tokenizer, "chat_template", None) or "")


def render_messages(messages: list[dict[str, Any]], plan: ToolPlan | None,
                    parser: ToolCallParser, native: bool,
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the template, the `tools` argument for a template that takes it).
    messages: as templates take them (role, content, tool_calls, tool_call_id)."""
    tools = None if plan is None else [t.model_dump(exclude_none=True) for t in plan.tools]
    if native:
        return messages, tools
    rendered = [_plain(message, parser) for message in messages]
    if tools:
        listing = _tool_prompt(tools, parser)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + listing}
        else:
            rendered.insert(0, {"role": "system", "content": listing})
    return rendered, None


def _tool_prompt(tools: list[dict[str, Any]], parser: ToolCallParser) -> str:
    functions = "\n".join(json.dumps(t["function"]) for t in tools)
    return ("You can call these functions (JSON Schema):\n" + functions + "\n\n"
            + parser.instructions())


def _plain(message: dict[str, Any], parser: ToolCallParser) -> dict[str, Any]:
    """A message as a template that knows no tools can render it."""
    if message["role"] == "tool":
        return {"role": "user",
                "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    written = parser.write_calls([{"name": c["function"]["name"],
                                   "arguments": c["function"]["arguments"]} for c in calls])
    content = "\n".join(part for part in (message["content"], written) if part)
    return {"role": "assistant", "content": content}


def turn_messages(tokenizer: Any, parser: ToolCallParser, messages: list[dict[str, Any]],
                  plan: ToolPlan | None, shown_before: bool,
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A Responses turn's messages and `tools` argument. shown_before: the conversation it
    continues had the tools already (its state has read their listing): a template that
    renders tools gets them again, which changes nothing (a continuation is the difference
    of two renderings with the same tools), and no listing is added again."""
    native = template_knows_tools(tokenizer)
    return render_messages(messages, plan if native or not shown_before else None, parser,
                           native)
