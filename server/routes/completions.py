"""POST /v1/completions."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.context import get_context
from server.generation import prepare_run
from server.protocol.completion import CompletionRequest
from server.sampling import COMPLETION_NAMES, check_completion, completion_params, error_names
from server.serving.completions import CompletionSession, Echo
from server.serving.prompts import prompt_ids, prompt_text, token_names
from server.serving.respond import respond

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.resolve_model(body.model)
    check_completion(body)
    params = completion_params(body, ctx.vocab_size)
    ids = prompt_ids(ctx, body.prompt)
    echoes = [
        Echo(prompt_text(ctx, prompt), tokens) if body.echo else None
        for prompt, tokens in zip(body.prompt, ids, strict=True)
    ]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    names = token_names(ctx, body.return_tokens_as_token_ids)
    session = CompletionSession(request_id, model, body, ids, echoes, names)
    run = prepare_run(ctx, request_id, ids, params, error_names(COMPLETION_NAMES))
    return await respond(request, body.streaming, session, run)
