"""A stream's content events come from a template (`TextEvent`): byte for byte what serialising
the chunk model gives, for any text a token may decode to."""

from __future__ import annotations

import random

import pytest

from server.http.sse import TextEvent, sse
from server.protocol.chat import ChatCompletionChunk, ChatDelta, ChatStreamChoice
from server.protocol.completion import CompletionChoice, CompletionResponse

# Every class of character JSON writers treat differently: controls, quotes, backslashes,
# DEL, Latin-1, the line separators some line splitters break at, the BMP, beyond it.
ALPHABET = [chr(c) for c in range(0x20)] + list('"\\/ aZ~\x7f\x85\xa0é') + [
    "\u2028", "\u2029", "\ufffd", "中", "😀", "\U0010ffff"]


def texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [""] + ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 12)))
                   for _ in range(count)]


def chat_chunk(text: str, index: int, usage: bool) -> ChatCompletionChunk:
    choice = ChatStreamChoice(index=index, delta=ChatDelta(content=text))
    chunk = ChatCompletionChunk(id="chatcmpl-1", created=7, model="org/m", choices=[choice])
    if usage:
        chunk.usage = None
    return chunk


def completion_chunk(text: str, index: int, usage: bool) -> CompletionResponse:
    choice = CompletionChoice(index=index, text=text)
    chunk = CompletionResponse(id="cmpl-1", created=7, model="org/m", choices=[choice])
    if usage:
        chunk.usage = None
    return chunk


@pytest.mark.parametrize("build", [chat_chunk, completion_chunk])
@pytest.mark.parametrize("usage", [False, True])
def test_template_events_equal_the_models(build, usage):
    event = TextEvent(build(TextEvent.MARKER, 3, usage))
    for text in texts(300, seed=usage):
        assert event(text) == sse(build(text, 3, usage)), repr(text)


def test_a_chunk_without_the_marker_once_is_refused():
    with pytest.raises(ValueError, match="marker"):
        TextEvent(chat_chunk("no marker", 0, False))
