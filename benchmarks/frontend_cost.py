"""What one streamed token costs a front end's CPU, part by part, with the path each part
replaced beside it (both are in the code: the window detokenizer is the stream's fallback,
the chunk models build every event that is not a plain content delta).

    python benchmarks/frontend_cost.py --streams 256 --steps 200

Parts, per token: turning the core's step into outputs (`OutputProcessor.process`:
detokenizing, building the delta outputs), and writing the chat chunk's SSE event. Tokens are
real text (an Austen novel, or random words) through the embedded model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.http.sse import TextEvent, sse
from server.protocol.chat import ChatCompletionChunk, ChatDelta, ChatStreamChoice
from tova_engine import SamplingParams
from tova_engine.core.messages import StepOutputs
from tova_engine.frontend.detokenizer import IncrementalDetokenizer
from tova_engine.frontend.output_processor import (
    OutputProcessor,
    RequestState,
    SequenceState,
)
from tova_engine.loader.source import load_source
from tova_engine.outputs import RequestMetrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pride_and_prejudice.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=256, help="requests in every step")
    p.add_argument("--steps", type=int, default=200, help="tokens each stream gets")
    p.add_argument("--dataset-path", type=Path, default=DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="save the table as JSON")
    return p.parse_args(argv)


def token_streams(tokenizer, args) -> list[list[int]]:
    rng = random.Random(args.seed)
    if args.dataset_path.exists():
        text = args.dataset_path.read_text()
    else:
        words = ["the", "state", "keeps", "what", "matters", "café", "日本", "—", "\n"]
        text = " ".join(rng.choice(words) for _ in range(200_000))
    streams = []
    for _ in range(args.streams):
        start = rng.randrange(len(text) - 20_000)
        ids = tokenizer.encode(text[start : start + 20_000], add_special_tokens=False)
        streams.append(ids[: args.steps])
    return streams


def processing_us(tokenizer, streams, stream_decode: bool) -> float:
    """µs per token in OutputProcessor.process, delta outputs as the server asks."""
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=len(streams[0]), output_kind="delta")
    prompt = tokenizer.encode("Tell me a story.")
    ids = []
    for i in range(len(streams)):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        if not stream_decode:
            detokenizer._stream = None
        sequence = SequenceState(0, detokenizer, None)
        processor.add(RequestState(f"r{i}", None, prompt, params, [sequence],
                                   RequestMetrics(time.time())))
        ids.append(f"r{i}")
    steps = len(streams[0])
    started = time.perf_counter()
    for step in range(steps):
        tokens = [stream[step] for stream in streams]
        outputs = processor.process(StepOutputs(time.time(), [], ids, [0] * len(ids), tokens))
        assert len(outputs.outputs) == len(ids)
    return (time.perf_counter() - started) / (steps * len(streams)) * 1e6


def event_us(texts: list[str], template: bool) -> float:
    """µs per token for a chat content delta's SSE event."""
    def chunk(text: str) -> ChatCompletionChunk:
        choice = ChatStreamChoice(index=0, delta=ChatDelta(content=text))
        return ChatCompletionChunk(id="chatcmpl-0", created=0, model="m", choices=[choice])

    event = TextEvent(chunk(TextEvent.MARKER))
    started = time.perf_counter()
    for text in texts:
        event(text) if template else sse(chunk(text))
    return (time.perf_counter() - started) / len(texts) * 1e6


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer = load_source(None, load_format="dummy").tokenizer
    streams = token_streams(tokenizer, args)
    texts = [tokenizer.decode([t]) for stream in streams for t in stream]
    rows = {
        "outputs, window detokenizer": processing_us(tokenizer, streams, stream_decode=False),
        "outputs, DecodeStream": processing_us(tokenizer, streams, stream_decode=True),
        "SSE event, chunk models": event_us(texts, template=False),
        "SSE event, template": event_us(texts, template=True),
    }
    print(f"{args.streams} streams x {args.steps} tokens; µs per token (one core)")
    print("| part | µs / token |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} |")
    result = {"config": vars(args) | {"dataset_path": str(args.dataset_path)}, "us_per_token": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
