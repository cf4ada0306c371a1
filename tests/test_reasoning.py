"""`--reasoning-parser qwen3`: a leading <think> block becomes `reasoning_content`, streamed
as `delta.reasoning_content`; the stream's pieces join to the whole response's split however
the text is cut into deltas; outputs without a block are all content."""

from __future__ import annotations

import itertools
import random

import pytest

from server.cli import build_parser
from server.serving.chat import ChatChoiceState
from server.serving.openai_logprobs import TokenNames
from server.serving.reasoning import split_reasoning
from tova_engine import CompletionOutput

THOUGHT = "<think>\nTwo and two: four.\n</think>\n\nIt is 4."


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    (THOUGHT, "\nTwo and two: four.\n", "It is 4."),
    ("It is 4.", None, "It is 4."),
    ("<think>cut off by max_tokens", "cut off by max_tokens", ""),
    ("  <think></think>answer", "", "answer"),
    ("<thinking> is not the tag", None, "<thinking> is not the tag"),
    ("an answer that mentions <think> later", None, "an answer that mentions <think> later"),
])
def test_whole_outputs(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)


def stream(text: str, cuts: list[int]):
    """The choice's stream chunks and final message for `text` delivered in pieces."""
    state = ChatChoiceState(0, None, TokenNames(lambda t: None), reasoning=True)
    bounds = [0, *cuts, len(text)]
    chunks = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        last = i == len(bounds) - 2
        out = CompletionOutput(0, text[a:b], [1], finish_reason="stop" if last else None)
        chunks += state.update(out)
    return chunks, state.result().message


@pytest.mark.parametrize("text", [THOUGHT, "It is 4.", "<think>unfinished", "<thi"])
def test_streamed_pieces_join_to_the_split(text):
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(4, len(text) - 1)))
        chunks, message = stream(text, cuts)
        reasoning = "".join(c.delta.reasoning_content or "" for c in chunks)
        content = "".join(c.delta.content or "" for c in chunks)
        expected_reasoning, expected_content = split_reasoning(text)
        assert reasoning == (expected_reasoning or "")
        assert content == expected_content == message.content
        assert message.reasoning_content == expected_reasoning
        assert all("<think>" not in (c.delta.content or "") for c in chunks) or \
            expected_reasoning is None


def test_the_flag_reaches_the_settings():
    args = build_parser().parse_args(["--reasoning-parser", "qwen3"])
    assert args.reasoning_parser == "qwen3"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--reasoning-parser", "deepseek"])
