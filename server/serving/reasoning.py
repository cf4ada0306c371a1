"""Reasoning models' thoughts split from their answer (`--reasoning-parser qwen3`, as vLLM's):
the text inside a leading `<think>...</think>` becomes `reasoning_content`, the rest
`content`.

Qwen3 writes its thinking first, between the tags (with `enable_thinking: false` in
`chat_template_kwargs` its template closes an empty block in the prompt, so the reply is all
answer). An output that does not open with the block is all content; one cut off inside it
(max_tokens) is all reasoning, as vLLM reports it.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ReasoningStream:
    """An output's deltas split into (reasoning, content) pieces as they come; text that may
    still turn out to be a tag is held back until it is decided."""

    def __init__(self) -> None:
        self._text = ""
        self.thinking = False  # the output opened a block
        self._sent = [0, 0]  # characters of reasoning and content given out

    def push(self, delta: str, final: bool = False) -> tuple[str, str]:
        self._text += delta
        text = self._text
        stripped = text.lstrip()
        if stripped.startswith(OPEN):
            self.thinking = True
            inner = stripped[len(OPEN):]
            close = inner.find(CLOSE)
            if close < 0:
                reasoning = inner if final else inner[: len(inner) - _partial(inner, CLOSE)]
                content = ""
            else:
                reasoning, content = inner[:close], inner[close + len(CLOSE):].lstrip()
        elif not final and OPEN.startswith(stripped):  # may still become the opening tag
            reasoning = content = ""
        else:
            reasoning, content = "", text
        pieces = (reasoning[self._sent[0]:], content[self._sent[1]:])
        self._sent = [max(self._sent[0], len(reasoning)), max(self._sent[1], len(content))]
        return pieces


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, or None when the output opened no block; content) of a whole output."""
    stream = ReasoningStream()
    reasoning, content = stream.push(text, final=True)
    return (reasoning if stream.thinking else None), content


def _partial(text: str, tag: str) -> int:
    """How many trailing characters of `text` may be the start of `tag`."""
    for keep in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-keep:]):
            return keep
    return 0
