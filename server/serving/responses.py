"""/v1/responses: engine delta outputs -> the Responses API's object, or its event stream.

The output is a list of items in the order the model wrote them: a message (its text) and,
with tools, function calls (server/serving/tool_calls/). A stream goes: response.created,
response.in_progress; per message item output_item.added, content_part.added,
output_text.delta per chunk of text, output_text.done, content_part.done, output_item.done;
per function call output_item.added, function_call_arguments.delta, .done, output_item.done;
then response.completed (response.incomplete when max_output_tokens cut it), each event with
its sequence_number, as OpenAI's API sends them and its clients accumulate them. Without
tools the message item opens at once; with tools, when its first text arrives.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from server.protocol.responses import ResponsesRequest
from server.protocol.tools import ToolCallOut
from server.serving.generation import GenerationRun
from server.serving.state_usage import StateBudget
from server.serving.tool_calls.plan import ToolPlan
from server.serving.tool_calls.stream import ToolCallStream


class ResponseDraft:
    """One response as it is generated; `snapshot()` is the Responses API object."""

    def __init__(self, response_id: str, model: str, body: ResponsesRequest,
                 input_tokens: int, continued_tokens: int,
                 state: StateBudget | None = None, tools: ToolPlan | None = None) -> None:
        """continued_tokens: the input tokens the continued state already stands for; state:
        the request's state budget, for usage.state_details; tools: calls may come back."""
        self.id = response_id
        self.state = state
        self.model = model
        self.body = body
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.input_tokens = input_tokens
        self.continued_tokens = continued_tokens
        # Input tokens the prefix cache restored (a first turn only: a continued one starts
        # from its state, never from a cached prefix).
        self.restored_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.calls = None if tools is None else ToolCallStream(tools)
        self.items: list[dict[str, Any]] = []  # the output, in order
        self._text_parts: list[str] = []  # the model's text (without tools: the content)

    @property
    def cut(self) -> bool:
        """Its tool calls ended it before the engine did (which is then asked to)."""
        return self.calls is not None and self.calls.stopped and self.finish_reason is not None

    @property
    def cached_tokens(self) -> int:
        return self.continued_tokens + self.restored_tokens

    @property
    def status(self) -> str:
        if self.finish_reason is None:
            return "in_progress"
        return "incomplete" if self.finish_reason == "length" else "completed"

    def add(self, text: str, token_ids: list[int], finish_reason: str | None,
            ) -> list[tuple[str, Any]]:
        """What a delta adds to the output, in order: ("text", piece) for the message being
        written, ("call", ToolCallOut) for a completed call."""
        self.token_ids += token_ids
        if self.finish_reason is not None:  # ended by its calls: the rest is not its output
            return []
        changes: list[tuple[str, Any]] = []
        if self.calls is None:
            if text:
                changes.append(("text", text))
        else:
            self._text_parts.append(text)
            progress = self.calls.push("".join(self._text_parts), final=finish_reason is not None)
            if progress.content:
                changes.append(("text", progress.content))
            changes += [("call", call) for call in progress.calls]
            if progress.stop and finish_reason is None:
                finish_reason = "tool_calls"
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.completed_at = int(time.time())
        return changes

    def open_message(self) -> dict[str, Any]:
        item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": "in_progress",
                "role": "assistant", "content": [text_part("")]}
        self.items.append(item)
        return item

    def add_call(self, call: ToolCallOut) -> dict[str, Any]:
        item = {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "completed",
                "call_id": call.id, "name": call.function.name,
                "arguments": call.function.arguments}
        self.items.append(item)
        return item

    def end_items(self) -> None:
        """At the end: every message item takes the response's status."""
        for item in self.items:
            if item["type"] == "message":
                item["status"] = self.status

    def snapshot(self, with_output: bool = True) -> dict[str, Any]:
        body = self.body
        done = self.finish_reason is not None
        usage = None
        if done:
            output_tokens = len(self.token_ids)
            usage = {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens,
                                         "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + output_tokens,
            }
            if self.state is not None:  # the input counts the continued state's tokens too
                details = self.state.details([self.input_tokens],
                                             [(self.input_tokens, output_tokens)])
                usage["state_details"] = details.model_dump()
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "background": False, "error": None,
            "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": list(self.items) if with_output and done else [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "store": body.stored,
            "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": _format(body)}, "tool_choice": _tool_choice(body),
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or ()],
            "max_tool_calls": body.max_tool_calls,
            "truncation": "disabled", "usage": usage, "user": body.user,
            "metadata": body.metadata or {}, "completed_at": self.completed_at,
        }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponsesSession:
    def __init__(self, draft: ResponseDraft,
                 on_done: Callable[[ResponseDraft], None]) -> None:
        """on_done: called once the response has finished (stores it)."""
        self.draft = draft
        self._on_done = on_done
        self._sequence = 0
        self._message: dict[str, Any] | None = None  # the message item being written

    async def _changes(self, run: GenerationRun) -> AsyncIterator[tuple[str, Any]]:
        """The output's changes as they come. A response its calls ended is finished in
        the engine too, and read to the engine's end, so its kept state is saved first."""
        told = False
        async for _, output in run:
            self.draft.restored_tokens = output.num_cached_tokens
            out = output.outputs[0]
            for change in self.draft.add(out.text, out.token_ids, out.finish_reason):
                yield change
            if self.draft.cut and not told:
                told = True
                run.finish_choice(0, 0)

    def _finish(self) -> None:
        """Once the output is whole: statuses set, and the response stored (if it asked)."""
        if self.draft.finish_reason is not None:
            self.draft.end_items()
            self._on_done(self.draft)

    async def collect(self, run: GenerationRun) -> Response:
        async for kind, value in self._changes(run):
            if kind == "call":
                self._message = None
                self.draft.add_call(value)
            else:
                self._text_item()["content"][0]["text"] += value
        if not self.draft.items:
            self.draft.open_message()
        self._finish()
        return Response(json.dumps(self.draft.snapshot()), media_type="application/json")

    def _text_item(self) -> dict[str, Any]:
        if self._message is None:
            self._message = self.draft.open_message()
        return self._message

    def _event(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"

    async def stream(self, run: GenerationRun) -> AsyncIterator[str]:
        draft = self.draft
        yield self._event("response.created", response=draft.snapshot())
        yield self._event("response.in_progress", response=draft.snapshot())
        if draft.calls is None:  # text only: the message opens at once
            for event in self._open_message():
                yield event
        async for kind, value in self._changes(run):
            if kind == "call":
                for event in [*self._close_message(), *self._call_events(value)]:
                    yield event
                continue
            if self._message is None:
                for event in self._open_message():
                    yield event
            self._message["content"][0]["text"] += value
            yield self._event("response.output_text.delta", **self._place(), delta=value,
                              logprobs=[])
        if not draft.items:  # nothing written: one empty message, as without tools
            for event in self._open_message():
                yield event
        for event in self._close_message():
            yield event
        self._finish()
        final = "response.incomplete" if draft.status == "incomplete" else "response.completed"
        yield self._event(final, response=draft.snapshot())

    def _place(self) -> dict[str, Any]:
        return {"item_id": self._message["id"], "output_index": len(self.draft.items) - 1,
                "content_index": 0}

    def _open_message(self) -> list[str]:
        self._message = self.draft.open_message()
        item = {**self._message, "content": []}
        return [self._event("response.output_item.added", output_index=len(self.draft.items) - 1,
                            item=item),
                self._event("response.content_part.added", **self._place(), part=text_part(""))]

    def _close_message(self) -> list[str]:
        if self._message is None:
            return []
        place, message = self._place(), self._message
        text = message["content"][0]["text"]
        message["status"] = self.draft.status if self.draft.finish_reason else "completed"
        self._message = None
        return [self._event("response.output_text.done", **place, text=text, logprobs=[]),
                self._event("response.content_part.done", **place, part=text_part(text)),
                self._event("response.output_item.done", output_index=place["output_index"],
                            item=message)]

    def _call_events(self, call: ToolCallOut) -> list[str]:
        item = self.draft.add_call(call)
        index = len(self.draft.items) - 1
        place = {"item_id": item["id"], "output_index": index}
        return [self._event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", **place,
                            delta=item["arguments"]),
                self._event("response.function_call_arguments.done", **place,
                            name=item["name"], arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=item)]


def _format(body) -> dict:
    """The response's `text.format`: the request's, as OpenAI echoes it."""
    form = None if body.text is None else body.text.format
    if form is None:
        return {"type": "text"}
    return form.model_dump(exclude_none=True, by_alias=True)


def _tool_choice(body: ResponsesRequest) -> Any:
    """The response's `tool_choice`: the request's, or OpenAI's default (auto with tools)."""
    choice = body.tool_choice
    if choice is None:
        return "auto" if body.tools else "none"
    return choice if isinstance(choice, str) else choice.model_dump()
