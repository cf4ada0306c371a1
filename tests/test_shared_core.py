"""Front ends attached to a shared core, in one test process: each gets exactly its own
requests' tokens (greedy, against the in-process engine), one attached while another streams
starts cleanly, and a core that dies fails every front end's streams and comes back to all."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from tests.server_utils import wait_until
from tova_engine import LLM, AsyncEngine, EngineConfig, EngineDeadError, SamplingParams
from tova_engine.frontend.core_client import RestartPolicy
from tova_engine.frontend.shared_core import SharedCore

CONFIG = dict(dtype="float64", device="cpu", state_size=8, max_num_seqs=6, prefill_chunk_size=4)
PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12], [3, 7]]


@pytest.fixture(scope="module")
def config(tiny_llama) -> EngineConfig:
    return EngineConfig(model=str(tiny_llama), **CONFIG)


@pytest.fixture(scope="module")
def reference(config) -> list[list[int]]:
    llm = LLM(model=config.model, **CONFIG)
    outputs = llm.generate(PROMPTS, greedy(24, "final"), use_tqdm=False)
    return [out.outputs[0].token_ids for out in outputs]


@pytest.fixture
def shared(config):
    core = SharedCore(config, 2, restart=RestartPolicy(backoff_s=0.1))
    core.start()
    yield core
    core.shutdown()


def greedy(max_tokens: int, kind: str = "delta") -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          output_kind=kind)


async def tokens_of(engine: AsyncEngine, prompt: list[int], max_tokens: int = 24) -> list[int]:
    tokens = []
    async for out in engine.generate(prompt, greedy(max_tokens)):
        tokens += out.outputs[0].token_ids
    return tokens


def test_each_front_end_gets_its_own_tokens_and_one_attaches_while_another_streams(
        config, reference, shared, caplog):
    caplog.set_level(logging.ERROR, logger="tova_engine")
    first = AsyncEngine(config, attach=shared.attachment(0))
    second = None
    try:
        async def run():
            nonlocal second
            # A long stream on the first front end: the core sends every step's stats to
            # both from the moment the second is attached.
            long = asyncio.create_task(tokens_of(first, [1, 2, 3], max_tokens=400))
            await asyncio.sleep(0.3)
            second = await asyncio.to_thread(AsyncEngine, config, attach=shared.attachment(1))
            mixed = await asyncio.gather(*(tokens_of(engine, prompt) for engine, prompt in
                                           zip((first, second, second), PROMPTS, strict=True)))
            return mixed, await long

        mixed, long = asyncio.run(run())
        assert mixed == reference
        assert len(long) == 400
        assert first.client_index == 0 and second.client_index == 1
        assert first.core_pid == second.core_pid == shared.pid
        assert not caplog.records, caplog.text
    finally:
        first.shutdown()
        if second is not None:
            second.shutdown()


def test_a_dead_core_fails_every_front_ends_streams_and_comes_back_to_all(
        config, reference, shared):
    engines = [AsyncEngine(config, attach=shared.attachment(i)) for i in range(2)]
    try:
        async def stream_until_killed(engine: AsyncEngine, kill: bool) -> BaseException:
            try:
                async for _ in engine.generate([1, 2, 3], greedy(1000)):
                    if kill:
                        kill = False
                        os.kill(shared.pid, signal.SIGKILL)
            except EngineDeadError as exc:
                return exc
            raise AssertionError("the stream outlived its core")

        async def run():
            return await asyncio.gather(stream_until_killed(engines[0], True),
                                        stream_until_killed(engines[1], False))

        old_pid = shared.pid
        errors = asyncio.run(run())
        assert all("engine core" in str(error) for error in errors)
        wait_until(lambda: all(engine.is_ready for engine in engines), 60,
                   "both front ends to take requests again", poll_s=0.05)
        assert shared.restarts == 1 and shared.pid != old_pid
        assert [engine.restarts for engine in engines] == [1, 1]
        assert all(engine.core_pid == shared.pid for engine in engines)

        async def again():
            return await asyncio.gather(*(tokens_of(engine, prompt) for engine, prompt in
                                          zip((engines[1], engines[0], engines[1]), PROMPTS,
                                              strict=True)))

        assert asyncio.run(again()) == reference
    finally:
        for engine in engines:
            engine.shutdown()
