"""GET /v1/models and /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.http.openapi import json_responses
from server.protocol.tokenize import ModelCard, ModelList
from server.serving.context import ServerContext, get_context
from server.serving.respond import json_response

router = APIRouter()


def _card(ctx: ServerContext, name: str) -> ModelCard:
    return ModelCard(id=name, created=ctx.created, root=ctx.engine.info.model_name,
                     max_model_len=ctx.max_model_len)


@router.get("/v1/models", responses=json_responses(ModelList, 401))
async def list_models(request: Request) -> Response:
    ctx = get_context(request)
    return json_response(ModelList(data=[_card(ctx, n) for n in ctx.served_model_names]))


@router.get("/v1/models/{model:path}", responses=json_responses(ModelCard, 401, 404))
async def retrieve_model(model: str, request: Request) -> Response:
    ctx = get_context(request)
    return json_response(_card(ctx, ctx.resolve_model(model)))
