"""/v1/responses: engine delta outputs -> the Responses API's object, or its event stream.

A stream goes: response.created, response.in_progress, output_item.added, content_part.added,
output_text.delta per chunk of text, output_text.done, content_part.done, output_item.done,
then response.completed (response.incomplete when max_output_tokens cut it), each event with
its sequence_number, as OpenAI's API sends them and its clients accumulate them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from server.protocol.responses import ResponsesRequest
from server.serving.generation import GenerationRun
from server.serving.state_usage import StateBudget


class ResponseDraft:
    """One response as it is generated; `snapshot()` is the Responses API object."""

    def __init__(self, response_id: str, model: str, body: ResponsesRequest,
                 input_tokens: int, continued_tokens: int,
                 state: StateBudget | None = None) -> None:
        """continued_tokens: the input tokens the continued state already stands for; state:
        the request's state budget, for usage.state_details."""
        self.id = response_id
        self.state = state
        self.message_id = "msg_" + uuid.uuid4().hex
        self.model = model
        self.body = body
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.input_tokens = input_tokens
        self.continued_tokens = continued_tokens
        # Input tokens the prefix cache restored (a first turn only: a continued one starts
        # from its state, never from a cached prefix).
        self.restored_tokens = 0
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def cached_tokens(self) -> int:
        return self.continued_tokens + self.restored_tokens

    @property
    def status(self) -> str:
        if self.finish_reason is None:
            return "in_progress"
        return "incomplete" if self.finish_reason == "length" else "completed"

    def add(self, text: str, token_ids: list[int], finish_reason: str | None) -> None:
        self.parts.append(text)
        self.token_ids += token_ids
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.completed_at = int(time.time())

    def message(self, with_content: bool = True) -> dict[str, Any]:
        status = self.status if self.finish_reason is not None else "in_progress"
        content = [self.text_part()] if with_content else []
        return {"id": self.message_id, "type": "message", "status": status,
                "role": "assistant", "content": content}

    def text_part(self, text: str | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text if text is None else text,
                "annotations": [], "logprobs": []}

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
            "output": [self.message()] if with_output and done else [],
            "parallel_tool_calls": False,
            "previous_response_id": body.previous_response_id,
            "store": body.stored,
            "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": _format(body)}, "tool_choice": "none", "tools": [],
            "truncation": "disabled", "usage": usage, "user": body.user,
            "metadata": body.metadata or {}, "completed_at": self.completed_at,
        }


class ResponsesSession:
    def __init__(self, draft: ResponseDraft,
                 on_done: Callable[[ResponseDraft], None]) -> None:
        """on_done: called once the response has finished (stores it)."""
        self.draft = draft
        self._on_done = on_done
        self._sequence = 0

    async def _consume(self, run: GenerationRun) -> AsyncIterator[str]:
        async for _, output in run:
            self.draft.restored_tokens = output.num_cached_tokens
            out = output.outputs[0]
            self.draft.add(out.text, out.token_ids, out.finish_reason)
            yield out.text
        if self.draft.finish_reason is not None:
            self._on_done(self.draft)

    async def collect(self, run: GenerationRun) -> Response:
        async for _ in self._consume(run):
            pass
        return Response(json.dumps(self.draft.snapshot()), media_type="application/json")

    def _event(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"

    async def stream(self, run: GenerationRun) -> AsyncIterator[str]:
        draft = self.draft
        yield self._event("response.created", response=draft.snapshot())
        yield self._event("response.in_progress", response=draft.snapshot())
        place = {"item_id": draft.message_id, "output_index": 0, "content_index": 0}
        yield self._event("response.output_item.added", output_index=0,
                          item=draft.message(with_content=False))
        yield self._event("response.content_part.added", **place, part=draft.text_part(""))
        async for text in self._consume(run):
            if text:
                yield self._event("response.output_text.delta", **place, delta=text,
                                  logprobs=[])
        yield self._event("response.output_text.done", **place, text=draft.text, logprobs=[])
        yield self._event("response.content_part.done", **place, part=draft.text_part())
        yield self._event("response.output_item.done", output_index=0, item=draft.message())
        final = "response.incomplete" if draft.status == "incomplete" else "response.completed"
        yield self._event(final, response=draft.snapshot())


def _format(body) -> dict:
    """The response's `text.format`: the request's, as OpenAI echoes it."""
    form = None if body.text is None else body.text.format
    if form is None:
        return {"type": "text"}
    return form.model_dump(exclude_none=True, by_alias=True)
