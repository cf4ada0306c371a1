"""POST /v1/chat/completions."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.context import get_context
from server.generation import prepare_run
from server.protocol.chat import ChatCompletionRequest
from server.sampling import chat_names, chat_params, check_chat, error_names
from server.serving.chat import ChatSession
from server.serving.prompts import chat_prompt_ids, token_names
from server.serving.respond import respond

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.resolve_model(body.model)
    check_chat(body)
    params = chat_params(body, ctx.vocab_size)
    ids = chat_prompt_ids(ctx, body.messages, body.add_generation_prompt,
                          body.continue_final_message, body.chat_template_kwargs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    names = token_names(ctx, body.return_tokens_as_token_ids)
    session = ChatSession(request_id, model, body, len(ids), names)
    run = prepare_run(ctx, request_id, [ids], params, error_names(chat_names(body)))
    return await respond(request, body.streaming, session, run)
