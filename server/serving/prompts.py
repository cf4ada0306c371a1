"""Prompts to token ids: plain text through the tokenizer, messages through the chat template.

The server tokenizes (rather than handing text to the engine) so that prompt lengths are
known and every prompt is validated before any is submitted.
"""

from __future__ import annotations

from typing import Any

from server.http.errors import bad_request
from server.protocol.chat import ChatMessage
from server.serving.context import ServerContext
from server.serving.openai_logprobs import TokenNames
from server.serving.tool_calls.plan import ToolPlan
from server.serving.tool_calls.render import render_messages, template_knows_tools


def prompt_ids(ctx: ServerContext, prompts: list[str | list[int]]) -> list[list[int]]:
    ids = []
    for prompt in prompts:
        if isinstance(prompt, list):
            ids.append(prompt)
            continue
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        try:
            ids.append(ctx.engine.tokenize(prompt))
        except ValueError as exc:  # no tokenizer: only token ids will do
            raise bad_request(str(exc), "prompt") from None
    return ids


def prompt_text(ctx: ServerContext, prompt: str | list[int]) -> str:
    """The text `echo` returns for a prompt given either way."""
    if isinstance(prompt, str):
        return prompt
    tokenizer = ctx.tokenizer
    return "" if tokenizer is None else tokenizer.decode(prompt)


def token_names(ctx: ServerContext, as_ids: bool) -> TokenNames:
    """How logprobs name tokens (text, or "token_id:N" on request or without a tokenizer)."""
    tokenizer = ctx.tokenizer
    if tokenizer is None:
        return TokenNames(lambda token_id: None, as_ids)
    return TokenNames(lambda token_id: tokenizer.decode([token_id]), as_ids)


def chat_prompt_ids(
    ctx: ServerContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
    tools: ToolPlan | None = None,
) -> list[int]:
    """tools: the request's tools, shown to the model (server/serving/tool_calls/render.py)."""
    tokenizer = ctx.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model has no chat template; use /v1/completions instead", "messages")
    rendered, tool_list = render_messages([m.for_template() for m in messages], tools,
                                          ctx.tool_parser, template_knows_tools(tokenizer))
    extra = dict(template_kwargs or {})
    if tool_list:
        extra["tools"] = tool_list
    try:
        ids = tokenizer.apply_chat_template(
            rendered,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True, return_dict=False, **extra,
        )
    except Exception as exc:  # template errors (jinja, role order) are the client's input
        raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
    return list(ids)
