"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.http.fault_injection import fault_processors
from server.http.openapi import generation_responses
from server.http.request_fields import check_request_fields
from server.http.request_log import log_request_body, name_request, track_generation
from server.protocol.completion import CompletionRequest, CompletionResponse
from server.serving.completions import CompletionSession, Echo
from server.serving.context import get_context
from server.serving.generation import prepare_run
from server.serving.prompts import prompt_ids, prompt_text, token_names
from server.serving.respond import respond
from server.serving.sampling import (
    COMPLETION_NAMES,
    check_completion,
    completion_params,
    error_names,
)

router = APIRouter()


@router.post("/v1/completions",
             responses=generation_responses(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    check_request_fields(body, request.url.path, ctx.settings.strict_request_fields)
    request_id = name_request(request, "cmpl-")
    if ctx.settings.log_requests:
        log_request_body(request_id, body)
    model = ctx.resolve_model(body.model)
    check_completion(body)
    faults = fault_processors(request, ctx.settings.enable_fault_injection)
    params = completion_params(body, ctx.vocab_size, faults,
                               any_whitespace=not ctx.settings.disable_any_whitespace)
    ids = prompt_ids(ctx, body.prompt)
    echoes = [
        Echo(prompt_text(ctx, prompt), tokens) if body.echo else None
        for prompt, tokens in zip(body.prompt, ids, strict=True)
    ]
    # Validated against the engine's limits (n among them) before anything is sized by them.
    run = prepare_run(ctx, request_id, ids, params, error_names(COMPLETION_NAMES))
    track_generation(request, run.record)
    names = token_names(ctx, body.return_tokens_as_token_ids)
    state = ctx.state_budget(body.state_size)
    session = CompletionSession(request_id, model, body, ids, echoes, names, state)
    headers = state.headers([len(prompt) for prompt in ids])
    return await respond(request, body.streaming, session, run, headers)
