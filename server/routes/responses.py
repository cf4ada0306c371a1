"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API.

With `store` (the default, as OpenAI's), the request keeps its state when it ends, under the
response's id. A request with `previous_response_id` continues from that state: the engine
restores it into a slot and prefills only the new turn (what the chat template adds after
the previous answer), so its time to first token does not grow with the conversation.
"""

from __future__ import annotations

import json
import uuid

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.context import ServerContext, get_context
from server.errors import bad_request, from_value_error, not_found_response
from server.generation import prepare_run
from server.openapi import generation_responses, json_responses
from server.protocol.responses import (
    DeletedResponse,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
)
from server.request_log import log_request_body, track_generation
from server.responses_store import StoredResponse
from server.sampling import error_names
from server.serving.conversation import continuation_ids, first_turn_ids
from server.serving.respond import respond
from server.serving.responses import ResponseDraft, ResponsesSession
from tova_engine import SamplingParams, SnapshotSpec

router = APIRouter()

_DIRECT = ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "state_size")
_NAMES = {"max_tokens": "max_output_tokens", "prompt": "input", "n": "n"}


@router.post("/v1/responses",
             responses=generation_responses(ResponseObject, ResponseStreamEvent))
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    ctx = get_context(request)
    response_id = "resp_" + uuid.uuid4().hex
    request.state.request_id = response_id
    if ctx.settings.log_requests:
        log_request_body(response_id, body)
    model = ctx.resolve_model(body.model)
    store = body.store is not False
    previous = _previous(ctx, body) if body.previous_response_id else None
    messages = body.messages()
    if previous is None:
        ids, cached = first_turn_ids(ctx.tokenizer, messages), 0
    else:
        ids = continuation_ids(ctx.tokenizer, messages, previous.last_token_id)
        cached = ctx.engine.saved_states[previous.id].num_tokens
    params = _params(body, keep_state=store)
    names = error_names(_NAMES)
    run = prepare_run(ctx, response_id, [ids], params, names,
                      resume_key=None if previous is None else previous.id, single_id=True)
    track_generation(request, run.record)
    draft = ResponseDraft(response_id, model, body, input_tokens=cached + len(ids),
                          cached_tokens=cached)
    session = ResponsesSession(draft, lambda done: _store(ctx, done, store))
    return await respond(request, body.streaming, session, run)


@router.get("/v1/responses/{response_id}", responses=json_responses(ResponseObject, 401, 404))
async def retrieve_response(response_id: str, request: Request) -> Response:
    record = _stored(get_context(request), response_id)
    return Response(json.dumps(record.response), media_type="application/json")


@router.delete("/v1/responses/{response_id}",
               responses=json_responses(DeletedResponse, 401, 404))
async def delete_response(response_id: str, request: Request) -> Response:
    ctx = get_context(request)
    _stored(ctx, response_id)
    ctx.responses.delete(response_id)
    ctx.engine.drop_states([response_id])
    body = {"id": response_id, "object": "response", "deleted": True}
    return Response(json.dumps(body), media_type="application/json")


def _stored(ctx: ServerContext, response_id: str) -> StoredResponse:
    ctx.responses.prune(ctx.engine.saved_states)
    record = ctx.responses.get(response_id)
    if record is None:
        raise not_found_response(None, response_id)
    return record


def _previous(ctx: ServerContext, body: ResponsesRequest) -> StoredResponse:
    """The stored response to continue: 404 if unknown or expired, 400 if its state was
    made under another configuration than this request would run with."""
    ctx.require_engine()
    ctx.responses.prune(ctx.engine.saved_states)
    record = ctx.responses.get(body.previous_response_id)
    if record is None or record.id not in ctx.engine.saved_states:
        raise not_found_response("previous_response_id", body.previous_response_id)
    why = record.spec.mismatch(_spec(ctx, body))
    if why is not None:
        raise bad_request(f"previous_response_id {record.id!r} cannot be continued: {why}",
                          "previous_response_id")
    return record


def _spec(ctx: ServerContext, body: ResponsesRequest) -> SnapshotSpec:
    """What a state made by this request is, or must have been made with to continue."""
    info = ctx.engine.info
    capacity = body.state_size if body.state_size is not None else info.state_size
    return SnapshotSpec(info.model_name, info.dtype, info.state_size, capacity, info.policy)


def _params(body: ResponsesRequest, keep_state: bool) -> SamplingParams:
    fields = {name: getattr(body, name) for name in _DIRECT if getattr(body, name) is not None}
    try:
        return SamplingParams(max_tokens=body.max_output_tokens, keep_state=keep_state,
                              output_kind="delta", **fields)
    except ValueError as exc:
        raise from_value_error(exc, error_names(_NAMES)) from None


def _store(ctx: ServerContext, draft: ResponseDraft, store: bool) -> None:
    if not store or draft.id not in ctx.engine.saved_states:
        return  # store: false, or the state could not be kept (failed, too large)
    spec = _spec(ctx, draft.body)
    ctx.responses.put(StoredResponse(
        response=draft.snapshot(), last_token_id=draft.token_ids[-1] if draft.token_ids else None,
        model=spec.model, dtype=spec.dtype, policy=spec.policy, state_size=spec.state_size,
        capacity=spec.capacity,
    ))
