"""POST /tokenize and /detokenize, GET /tokenizer_info (vLLM's): the server's tokenizer and
chat template."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.http.errors import bad_request
from server.http.openapi import body_responses, json_responses
from server.http.request_fields import check_request_fields
from server.protocol.fields import is_token_id
from server.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from server.serving.context import ServerContext, get_context
from server.serving.prompts import chat_prompt_ids
from server.serving.respond import json_response

router = APIRouter()


def _tokenizer(ctx: ServerContext, param: str):
    if ctx.tokenizer is None:
        raise bad_request("this model was loaded without a tokenizer", param)
    return ctx.tokenizer


@router.post("/tokenize", responses=body_responses(TokenizeResponse, 404))
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    ctx = get_context(request)
    check_request_fields(body, request.url.path, ctx.settings.strict_request_fields)
    ctx.resolve_model(body.model)
    if body.messages is not None:
        tokens = chat_prompt_ids(ctx, body.messages, body.add_generation_prompt,
                                 body.continue_final_message, body.chat_template_kwargs)
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = _tokenizer(ctx, "prompt").encode(body.prompt, add_special_tokens=add_special)
    response = TokenizeResponse(count=len(tokens), max_model_len=ctx.max_model_len,
                                tokens=tokens)
    if body.return_token_strs:
        response.token_strs = ctx.tokenizer.convert_ids_to_tokens(tokens)
    return json_response(response)


@router.post("/detokenize", responses=body_responses(DetokenizeResponse, 404))
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    ctx = get_context(request)
    check_request_fields(body, request.url.path, ctx.settings.strict_request_fields)
    ctx.resolve_model(body.model)
    tokenizer = _tokenizer(ctx, "tokens")
    vocab = ctx.vocab_size
    if not all(is_token_id(t) and t < vocab for t in body.tokens):
        raise bad_request(f"tokens must be token ids in [0, {vocab})", "tokens")
    return json_response(DetokenizeResponse(prompt=tokenizer.decode(body.tokens)))


@router.get("/tokenizer_info", responses=json_responses(TokenizerInfoResponse, 400))
async def tokenizer_info(request: Request) -> Response:
    ctx = get_context(request)
    tokenizer = _tokenizer(ctx, None)
    bos_id = tokenizer.bos_token_id
    adds_bos = None if bos_id is None else tokenizer.encode("a")[:1] == [bos_id]
    return json_response(TokenizerInfoResponse(
        tokenizer_class=type(tokenizer).__name__,
        bos_token=_text(tokenizer.bos_token),
        eos_token=_text(tokenizer.eos_token),
        pad_token=_text(tokenizer.pad_token),
        unk_token=_text(tokenizer.unk_token),
        add_bos_token=adds_bos,
        chat_template=getattr(tokenizer, "chat_template", None) or None,
        model_max_length=ctx.max_model_len,
    ))


def _text(token) -> str | None:
    """A special token as its text (transformers may hold an AddedToken)."""
    return None if token is None else str(token)
