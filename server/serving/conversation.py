"""The token ids of a conversation's next turn when it continues from a saved state.

The saved state has read the conversation up to the last token of the previous answer, which
it holds as pending (`StateSnapshot.pending_token_ids`: the engine feeds it first). What the
new turn adds is what the chat template puts after the answer's text: the end of the
assistant's turn, the new messages, and the prompt for the next answer. The template is
rendered twice around a placeholder answer, with and without the new messages, and the
difference taken: no history is needed, and every template that renders a conversation as
a prefix of its continuation works (ChatML, Llama 3, ...). If the previous answer ended on
the end-of-turn token itself (EOS), that token is the pending one and is not repeated.
"""

from __future__ import annotations

from typing import Any

from server.http.errors import bad_request

# Private-use characters: no template or tokenizer gives them a meaning.
_PLACEHOLDER = "\ue000tova-answer\ue001"


def first_turn_ids(tokenizer: Any, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
    """tools: the template's `tools` argument (for a template that renders them)."""
    _require_template(tokenizer)
    return list(_render(tokenizer, messages, tools, add_generation_prompt=True, tokenize=True))


def continuation_ids(
    tokenizer: Any, messages: list[dict[str, Any]], last_token_id: int | None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The tokens to feed after a saved state whose answer ended with `last_token_id`.
    tools: as the first turn gave them to the template; whatever they add before the
    conversation is in both renderings, so not in the difference."""
    _require_template(tokenizer)
    answered = [{"role": "user", "content": "?"},
                {"role": "assistant", "content": _PLACEHOLDER}]
    head = _render(tokenizer, answered, tools, add_generation_prompt=False, tokenize=False)
    full = _render(tokenizer, answered + messages, tools, add_generation_prompt=True,
                   tokenize=False)
    if not full.startswith(head) or _PLACEHOLDER not in head:
        raise bad_request(
            "this model's chat template cannot continue a conversation from a stored response "
            "(it does not render a conversation as a prefix of its continuation)",
            "previous_response_id")
    end_of_turn = head[head.index(_PLACEHOLDER) + len(_PLACEHOLDER):]
    if last_token_id is not None:
        last = tokenizer.decode([last_token_id], skip_special_tokens=False)
        if last and end_of_turn.startswith(last):  # the answer ended on the turn's end
            end_of_turn = end_of_turn[len(last):]
    text = end_of_turn + full[len(head):]
    return list(tokenizer.encode(text, add_special_tokens=False))


def _require_template(tokenizer: Any) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; the Responses API needs one",
                          "input")


def _render(tokenizer: Any, messages: list[dict[str, Any]],
            tools: list[dict[str, Any]] | None, **options: Any):
    if tools:
        options["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, return_dict=False, **options)
    except Exception as exc:  # template errors (jinja, role order) are the client's input
        raise bad_request(f"the chat template rejected the messages: {exc}", "input") from None
