"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.http.fault_injection import fault_processors
from server.http.openapi import generation_responses
from server.http.request_fields import check_request_fields
from server.http.request_log import log_request_body, name_request, track_generation
from server.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from server.serving.chat import ChatSession
from server.serving.context import get_context
from server.serving.generation import prepare_run
from server.serving.prompts import chat_prompt_ids, token_names
from server.serving.respond import respond
from server.serving.sampling import chat_names, chat_params, check_chat, error_names
from server.serving.tool_calls.plan import plan_chat_tools

router = APIRouter()


@router.post("/v1/chat/completions",
             responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    check_request_fields(body, request.url.path, ctx.settings.strict_request_fields)
    request_id = name_request(request, "chatcmpl-")
    if ctx.settings.log_requests:
        log_request_body(request_id, body)
    model = ctx.resolve_model(body.model)
    check_chat(body)
    tools = plan_chat_tools(body, ctx.tool_parser)
    faults = fault_processors(request, ctx.settings.enable_fault_injection)
    params = chat_params(body, ctx.vocab_size, faults,
                         tool_constraint=None if tools is None else tools.constraint,
                         any_whitespace=not ctx.settings.disable_any_whitespace)
    ids = chat_prompt_ids(ctx, body.messages, body.add_generation_prompt,
                          body.continue_final_message, body.chat_template_kwargs, tools)
    # Validated against the engine's limits (n among them) before anything is sized by them.
    run = prepare_run(ctx, request_id, [ids], params, error_names(chat_names(body)))
    track_generation(request, run.record)
    names = token_names(ctx, body.return_tokens_as_token_ids)
    state = ctx.state_budget(body.state_size)
    session = ChatSession(request_id, model, body, len(ids), names, tools,
                          reasoning=ctx.settings.reasoning_parser is not None, state=state)
    return await respond(request, body.streaming, session, run, state.headers([len(ids)]))
