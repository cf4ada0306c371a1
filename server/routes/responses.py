"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API.

With `store` (the default, as OpenAI's), the request keeps its state when it ends, under the
response's id. A request with `previous_response_id` continues from that state: the engine
restores it into a slot and prefills only the new turn (what the chat template adds after
the previous answer), so its time to first token does not grow with the conversation
(server/serving/stored_responses.py).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.http.errors import bad_request
from server.http.openapi import generation_responses, json_responses
from server.http.request_fields import check_request_fields
from server.http.request_log import log_request_body, name_request, track_generation
from server.protocol.responses import (
    DeletedResponse,
    InputItemList,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
)
from server.serving.context import get_context
from server.serving.generation import prepare_run
from server.serving.respond import respond
from server.serving.responses import ResponseDraft, ResponsesSession
from server.serving.sampling import RESPONSES_NAMES, error_names, responses_params
from server.serving.stored_responses import (
    drop_response,
    find_response,
    keep_response,
    list_input_items,
    next_turn,
)
from server.serving.tool_calls.plan import plan_response_tools

router = APIRouter()


@router.post("/v1/responses",
             responses=generation_responses(ResponseObject, ResponseStreamEvent))
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    ctx = get_context(request)
    check_request_fields(body, request.url.path, ctx.settings.strict_request_fields)
    response_id = name_request(request, "resp_")
    if ctx.settings.log_requests:
        log_request_body(response_id, body)
    model = ctx.resolve_model(body.model)
    tools = plan_response_tools(body, ctx.tool_parser)
    turn = next_turn(ctx, body, tools)
    params = responses_params(body, keep_state=body.stored,
                              any_whitespace=not ctx.settings.disable_any_whitespace,
                              tool_constraint=None if tools is None else tools.constraint)
    run = prepare_run(ctx, response_id, [turn.prompt_ids], params, error_names(RESPONSES_NAMES),
                      resume_key=turn.resume_key, single_id=True)
    track_generation(request, run.record)
    state = ctx.state_budget(body.state_size)
    draft = ResponseDraft(response_id, model, body, turn.input_tokens, turn.cached_tokens, state,
                          tools)
    session = ResponsesSession(draft, lambda done: keep_response(ctx, done))
    return await respond(request, body.streaming, session, run,
                         state.headers([turn.input_tokens]))


@router.get("/v1/responses/{response_id}", responses=json_responses(ResponseObject, 401, 404))
async def retrieve_response(response_id: str, request: Request) -> Response:
    record = find_response(get_context(request), response_id)
    return Response(json.dumps(record.response), media_type="application/json")


@router.get("/v1/responses/{response_id}/input_items",
            responses=json_responses(InputItemList, 400, 401, 404))
async def list_response_input_items(response_id: str, request: Request, limit: int = 20,
                                    order: str = "desc", after: str | None = None) -> Response:
    """A stored response's input, as OpenAI lists it (newest first unless order=asc)."""
    if not 1 <= limit <= 100:
        raise bad_request("limit must be between 1 and 100", "limit")
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", "order")
    record = find_response(get_context(request), response_id)
    page = list_input_items(record, limit, order, after)
    return Response(json.dumps(page), media_type="application/json")


@router.delete("/v1/responses/{response_id}",
               responses=json_responses(DeletedResponse, 401, 404))
async def delete_response(response_id: str, request: Request) -> Response:
    drop_response(get_context(request), response_id)
    body = {"id": response_id, "object": "response", "deleted": True}
    return Response(json.dumps(body), media_type="application/json")
