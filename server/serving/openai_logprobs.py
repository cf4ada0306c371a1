"""Engine logprobs ({token id: Logprob} per position, the chosen token first) in OpenAI's two
formats: the legacy completions lists and chat's per-token objects."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.protocol.chat import ChatLogprob, ChatTokenLogprob
from server.protocol.completion import CompletionLogprobs
from tova_engine import Logprob

Position = dict[int, Logprob]
# JSON has no -Infinity; OpenAI and vLLM floor logprobs at -9999.
_FLOOR = -9999.0


def _value(logprob: float) -> float:
    return _FLOOR if math.isnan(logprob) else max(logprob, _FLOOR)


@dataclass(frozen=True, slots=True)
class TokenNames:
    """How tokens are named in logprobs: their text, or "token_id:N" (vLLM's form) when the
    client asks for ids (`return_tokens_as_token_ids`) or there is no tokenizer."""

    decode: Callable[[int], str | None]
    as_ids: bool = False

    def __call__(self, token_id: int, logprob: Logprob | None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        text = logprob.decoded_token if logprob is not None else self.decode(token_id)
        return f"token_id:{token_id}" if text is None else text


def extend_completion_logprobs(
    out: CompletionLogprobs, token_ids: Sequence[int], positions: Sequence[Position | None],
    offset: int, names: TokenNames,
) -> int:
    """Append one entry per token; returns the text offset after the last one. A position of
    None (the prompt's first token) has a token but no logprob."""
    for token, position in zip(token_ids, positions, strict=True):
        chosen = position.get(token) if position is not None else None
        text = names(token, chosen)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if position is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_value(chosen.logprob) if chosen is not None else None)
        # The chosen token plus the top alternatives, as OpenAI's "up to logprobs + 1".
        top: dict[str, float] = {}
        for tid, lp in position.items():
            top.setdefault(names(tid, lp), _value(lp.logprob))
        out.top_logprobs.append(top)
    return offset


def chat_logprobs(
    token_ids: Sequence[int], positions: Sequence[Position], top_n: int, names: TokenNames,
) -> list[ChatTokenLogprob]:
    entries = []
    for token, position in zip(token_ids, positions, strict=True):
        chosen = position[token]
        # The engine ranks alternatives by position in its top-k; the chosen token carries
        # its true rank, so sorting by rank gives the real top_n.
        ranked = sorted(position.items(), key=lambda item: item[1].rank or math.inf)[:top_n]
        entries.append(ChatTokenLogprob(
            **_chat_entry(token, chosen, names),
            top_logprobs=[ChatLogprob(**_chat_entry(t, lp, names)) for t, lp in ranked],
        ))
    return entries


def _chat_entry(token: int, logprob: Logprob, names: TokenNames) -> dict:
    text = names(token, logprob)
    return {"token": text, "logprob": _value(logprob.logprob), "bytes": list(text.encode())}
