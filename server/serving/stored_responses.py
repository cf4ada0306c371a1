"""The Responses API's stored responses as requests use them: the turn a request runs (from
scratch, or continuing a stored response's saved state), keeping a finished response, finding
and deleting one. The records live in `ResponseStore`, their states in the engine's store; a
record whose state the engine has dropped is gone too.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from server.http.errors import bad_request
from server.protocol.responses import FunctionCallItem, FunctionCallOutputItem, ResponsesRequest
from server.serving.context import ServerContext
from server.serving.conversation import continuation_ids, first_turn_ids
from server.serving.response_lookup import find_stored
from server.serving.responses import ResponseDraft
from server.serving.responses_store import StoredResponse
from server.serving.tool_calls.plan import ToolPlan, check_call_outputs
from server.serving.tool_calls.render import turn_messages
from tova_engine import SnapshotSpec


class Turn(NamedTuple):
    prompt_ids: list[int]  # what the engine prefills
    cached_tokens: int  # tokens the continued state already stands for
    resume_key: str | None  # the stored response whose state it continues

    @property
    def input_tokens(self) -> int:
        return self.cached_tokens + len(self.prompt_ids)


def next_turn(ctx: ServerContext, body: ResponsesRequest, tools: ToolPlan | None = None) -> Turn:
    """tools: the request's, shown to the model where the conversation starts (or where it
    first has tools; server/serving/tool_calls/render.py)."""
    tokenizer, parser = ctx.tokenizer, ctx.tool_parser
    if not body.previous_response_id:
        check_call_outputs(body, set())
        messages, listed = turn_messages(tokenizer, parser, body.messages(), tools, False)
        return Turn(first_turn_ids(tokenizer, messages, listed), 0, None)
    previous = _previous(ctx, body)
    made = {item["call_id"] for item in previous.response["output"]
            if item.get("type") == "function_call"}
    check_call_outputs(body, made)
    messages, listed = turn_messages(tokenizer, parser, body.messages(), tools,
                                     shown_before=bool(previous.response.get("tools")))
    ids = continuation_ids(ctx.tokenizer, messages, previous.last_token_id, listed)
    return Turn(ids, ctx.engine.saved_states[previous.id].num_tokens, previous.id)


def keep_response(ctx: ServerContext, draft: ResponseDraft) -> None:
    """Store a finished response, if it asked to be and its state was kept."""
    if not draft.body.stored or draft.id not in ctx.engine.saved_states:
        return  # store: false, or the state could not be kept (failed, too large)
    ctx.responses.put(StoredResponse(
        response=draft.snapshot(), last_token_id=draft.token_ids[-1] if draft.token_ids else None,
        spec=_spec(ctx, draft.body), input_items=input_items(draft.body),
    ))


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as the Responses API lists it (`GET .../input_items`): items with
    ids; a message's text parts as input_text (output_text for the assistant's)."""
    items = []
    for item in body.items:
        if isinstance(item, FunctionCallItem):
            items.append({"id": item.id or "fc_" + uuid.uuid4().hex, "type": "function_call",
                          "status": "completed", "call_id": item.call_id, "name": item.name,
                          "arguments": item.arguments})
        elif isinstance(item, FunctionCallOutputItem):
            items.append({"id": item.id or "fco_" + uuid.uuid4().hex,
                          "type": "function_call_output", "status": "completed",
                          "call_id": item.call_id, "output": item.output})
        else:
            kind = "output_text" if item.role == "assistant" else "input_text"
            items.append({"id": item.id or "msg_" + uuid.uuid4().hex, "type": "message",
                          "role": item.role, "status": "completed",
                          "content": [{"type": kind, "text": item.content}]})
    return items


def list_input_items(record: StoredResponse, limit: int, order: str,
                     after: str | None) -> dict[str, Any]:
    """One page of a stored response's input items, OpenAI's list shape."""
    items = record.input_items if order == "asc" else record.input_items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


def find_response(ctx: ServerContext, response_id: str) -> StoredResponse:
    return find_stored(ctx, response_id, None)


def drop_response(ctx: ServerContext, response_id: str) -> None:
    find_response(ctx, response_id)
    ctx.responses.delete(response_id)
    ctx.engine.drop_states([response_id])


def _previous(ctx: ServerContext, body: ResponsesRequest) -> StoredResponse:
    """The stored response to continue: 404 if unknown or expired, 400 if its state was
    made under another configuration than this request would run with."""
    ctx.require_engine()
    record = find_stored(ctx, body.previous_response_id, "previous_response_id")
    why = record.spec.mismatch(_spec(ctx, body))
    if why is not None:
        raise bad_request(f"previous_response_id {record.id!r} cannot be continued: {why}",
                          "previous_response_id")
    return record


def _spec(ctx: ServerContext, body: ResponsesRequest) -> SnapshotSpec:
    """What a state made by this request is, or must have been made with to continue."""
    info = ctx.engine.info
    return info.snapshot_spec(body.state_size if body.state_size is not None else info.state_size)
