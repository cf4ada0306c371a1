"""AsyncEngine: streams, aborts and failures, with the loop on its own thread."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.test_correctness import PROMPT
from tova_engine import (
    AsyncEngine,
    EngineConfig,
    EngineDeadError,
    RequestFailedError,
    SamplingParams,
)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    config = EngineConfig(
        model=str(tiny_llama),
        dtype="float64",
        device="cpu",
        state_size=8,
        max_num_seqs=4,
        prefill_chunk_size=4,
    )
    async_engine = AsyncEngine(config)
    yield async_engine
    async_engine.shutdown()


def greedy(max_tokens: int, kind: str = "delta", **extra) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind, **extra
    )


async def collect(engine, prompt, params, request_id=None):
    tokens, outputs = [], []
    async for out in engine.generate(prompt, params, request_id):
        outputs.append(out)
        tokens += out.outputs[0].token_ids
    return tokens, outputs


def test_concurrent_streams_match_offline(engine):
    offline = engine.engine  # same weights: compare with a request run alone first
    alone, _ = asyncio.run(collect(engine, PROMPT, greedy(10)))

    async def many():
        return await asyncio.gather(*(collect(engine, PROMPT, greedy(10)) for _ in range(10)))

    results = asyncio.run(many())
    assert all(tokens == alone for tokens, _ in results)
    for _, outputs in results:
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
        assert not any(o.finished for o in outputs[:-1])
    assert offline.slots_used == 0


def test_cumulative_and_final_output_kinds(engine):
    _, cumulative = asyncio.run(collect(engine, PROMPT, greedy(5, "cumulative")))
    assert [len(o.outputs[0].token_ids) for o in cumulative] == [1, 2, 3, 4, 5]
    _, final = asyncio.run(collect(engine, PROMPT, greedy(5, "final")))
    assert len(final) == 1 and len(final[0].outputs[0].token_ids) == 5


def test_closing_stream_aborts_and_frees_slot(engine):
    async def run():
        stream = engine.generate(PROMPT, greedy(500))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if engine.engine.slots_used == 0 and not engine.engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(run())


def test_bad_input_raises_before_first_output(engine):
    async def run():
        with pytest.raises(ValueError, match="state_size"):
            await collect(engine, PROMPT, greedy(3, state_size=100))

    asyncio.run(run())
    assert engine.is_running


def test_request_failure_is_isolated(engine):
    def poison(token_ids, logits):
        return torch.full_like(logits, float("inf")) if token_ids else logits

    async def run():
        bad = collect(engine, PROMPT, greedy(6, logits_processors=[poison]))
        good = collect(engine, PROMPT, greedy(6))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(run())
    assert isinstance(bad, RequestFailedError)
    assert len(good[0]) == 6
    assert engine.is_running


def test_dead_loop_fails_waiters_and_refuses_new_requests(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), dtype="float64", device="cpu", state_size=8)
    engine = AsyncEngine(config)

    def broken_step():
        raise SystemExit("loop killed by test")

    async def run():
        stream = engine.generate(PROMPT, greedy(5))
        engine.engine.step = broken_step
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPT, greedy(5))

    asyncio.run(run())
