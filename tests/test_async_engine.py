"""AsyncEngine: the core in its own process. Outputs through the process boundary equal the
in-process engine's; streams, aborts, failures; a killed core fails what was in flight,
restarts, and serves again."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time

import pytest
import torch

from tests.server_utils import wait_until
from tests.test_correctness import PROMPT
from tova_engine import (
    AsyncEngine,
    EngineConfig,
    EngineDeadError,
    InvalidRequestError,
    LLMEngine,
    RequestFailedError,
    SamplingParams,
)
from tova_engine.frontend.core_client import RestartPolicy

CONFIG = dict(dtype="float64", device="cpu", state_size=8, max_num_seqs=6, prefill_chunk_size=4)


@pytest.fixture(scope="module")
def config(tiny_llama) -> EngineConfig:
    return EngineConfig(model=str(tiny_llama), **CONFIG)


@pytest.fixture(scope="module")
def engine(config):
    async_engine = AsyncEngine(config, restart_policy=RestartPolicy(backoff_s=0.1))
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def in_process(config) -> LLMEngine:
    return LLMEngine(config)


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


def merge_choices(merged: dict[int, dict], out) -> None:
    """Add one delta output to what each choice has so far."""
    for choice in out.outputs:
        entry = merged.setdefault(choice.index, {"tokens": [], "logprobs": [], "text": ""})
        entry["tokens"] += choice.token_ids
        entry["logprobs"] += choice.logprobs or []
        entry["text"] += choice.text
        entry["finish"] = (choice.finish_reason, choice.stop_reason)
        entry["state"] = choice.state_positions


def run_in_process(engine: LLMEngine, prompt, params: SamplingParams):
    """The same request through the in-process engine, outputs merged per choice."""
    engine.add_request(f"ref-{time.monotonic_ns()}", prompt, params)
    merged: dict[int, dict] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            merge_choices(merged, out)
    return merged


async def run_async(engine: AsyncEngine, prompt, params: SamplingParams):
    merged: dict[int, dict] = {}
    async for out in engine.generate(prompt, params):
        merge_choices(merged, out)
    return merged


@pytest.mark.parametrize(
    "params",
    [
        greedy(12, logprobs=3, return_state=True),
        SamplingParams(n=3, seed=7, temperature=0.8, max_tokens=9, logprobs=1,
                       return_state=True, output_kind="delta"),
        SamplingParams(max_tokens=0, prompt_logprobs=2, output_kind="delta"),
        greedy(10, stop_token_ids=[37], logprobs=0),
    ],
    ids=["greedy-logprobs-state", "n3-seeded", "prompt-logprobs", "stop-token"],
)
def test_outputs_equal_the_in_process_engine(engine, in_process, params):
    expected = run_in_process(in_process, PROMPT, params)
    got = asyncio.run(run_async(engine, PROMPT, params))
    assert got.keys() == expected.keys()
    for index in expected:
        assert got[index]["tokens"] == expected[index]["tokens"]
        assert got[index]["finish"] == expected[index]["finish"]
        assert got[index]["state"] == expected[index]["state"]
        for ours, ref in zip(got[index]["logprobs"], expected[index]["logprobs"], strict=True):
            assert {t: (lp.logprob, lp.rank) for t, lp in ours.items()} == {
                t: (lp.logprob, lp.rank) for t, lp in ref.items()
            }


def test_concurrent_streams_match_a_request_alone(engine):
    alone, _ = asyncio.run(collect(engine, PROMPT, greedy(10)))

    async def many():
        return await asyncio.gather(*(collect(engine, PROMPT, greedy(10)) for _ in range(10)))

    results = asyncio.run(many())
    assert all(tokens == alone for tokens, _ in results)
    for _, outputs in results:
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
        assert not any(o.finished for o in outputs[:-1])
    wait_for(lambda: engine.last_stats.slots_used == 0)


def test_a_slow_consumer_gets_every_token_in_fewer_outputs(engine):
    alone, _ = asyncio.run(collect(engine, PROMPT, greedy(40, logprobs=1)))

    async def slow():
        tokens, chunks = [], 0
        async for out in engine.generate(PROMPT, greedy(40, logprobs=1)):
            choice = out.outputs[0]
            assert len(choice.logprobs) == len(choice.token_ids)
            tokens += choice.token_ids
            chunks += 1
            await asyncio.sleep(0.05)  # the engine runs ahead; its outputs pile up
        return tokens, chunks

    tokens, chunks = asyncio.run(slow())
    assert tokens == alone and chunks < len(alone)


def test_cumulative_and_final_output_kinds(engine):
    _, cumulative = asyncio.run(collect(engine, PROMPT, greedy(5, "cumulative")))
    # Each output holds all tokens so far (a consumer that falls behind skips to the latest).
    lists = [o.outputs[0].token_ids for o in cumulative]
    assert len(lists[-1]) == 5 and cumulative[-1].finished
    assert all(a == b[: len(a)] and len(a) < len(b) for a, b in itertools.pairwise(lists))
    _, final = asyncio.run(collect(engine, PROMPT, greedy(5, "final")))
    assert len(final) == 1 and len(final[0].outputs[0].token_ids) == 5


def wait_for(condition, timeout_s: float = 10.0) -> None:
    wait_until(condition, timeout_s, "the condition", poll_s=0.02)


def test_closing_stream_aborts_and_frees_slot(engine):
    async def run():
        stream = engine.generate(PROMPT, greedy(500))
        await stream.__anext__()
        assert engine.last_stats.slots_used == 1
        await stream.aclose()

    asyncio.run(run())
    wait_for(lambda: engine.last_stats.slots_used == 0 and engine.last_stats.num_running == 0)


def test_bad_input_names_its_parameter_before_first_output(engine):
    async def run():
        with pytest.raises(InvalidRequestError, match="state_size") as caught:
            await collect(engine, PROMPT, greedy(3, state_size=100))
        return caught.value.param

    assert asyncio.run(run()) == "state_size"
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(logprobs=99)
    assert caught.value.param == "logprobs"
    assert engine.is_ready


def poison(token_ids, logits):
    """A logits processor that breaks its row once the request has a token (picklable: the
    core process imports it by name)."""
    return torch.full_like(logits, float("inf")) if token_ids else logits


def test_request_failure_is_isolated(engine):
    async def run():
        bad = collect(engine, PROMPT, greedy(6, logits_processors=[poison]))
        good = collect(engine, PROMPT, greedy(6))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(run())
    assert isinstance(bad, RequestFailedError)
    assert len(good[0]) == 6
    assert engine.is_ready


def test_a_bug_in_output_handling_fails_its_requests_not_the_engine(engine, monkeypatch):
    """An exception while turning a step into outputs ends that step's requests with an
    error; the client thread lives on, their slots are freed and the next request runs."""
    processor = engine._outputs
    append = processor._append

    def broken(state, seq, step, row):
        if state.request_id == "broken":
            raise RuntimeError("injected")
        return append(state, seq, step, row)

    monkeypatch.setattr(processor, "_append", broken)
    with pytest.raises(RequestFailedError, match="internal error"):
        asyncio.run(asyncio.wait_for(collect(engine, PROMPT, greedy(1000), "broken"), 20))
    monkeypatch.undo()
    # Freed by the abort, not by running its 1,000 tokens out.
    wait_for(lambda: engine.last_stats.slots_used == 0, timeout_s=2.0)
    tokens, _ = asyncio.run(collect(engine, PROMPT, greedy(6)))
    assert len(tokens) == 6
    assert engine.is_ready


def test_killed_core_fails_in_flight_requests_restarts_and_serves(config):
    engine = AsyncEngine(config, restart_policy=RestartPolicy(backoff_s=0.1))
    restarts = []
    engine.on_restart(lambda: restarts.append(1))
    try:
        old_pid = engine.core_pid

        async def in_flight():
            streams = [collect(engine, PROMPT, greedy(1000)) for _ in range(4)]
            tasks = [asyncio.ensure_future(s) for s in streams]
            await asyncio.sleep(0.5)
            os.kill(old_pid, signal.SIGKILL)
            return await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), timeout=10
            )

        results = asyncio.run(in_flight())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        # A new core takes seconds to start: meanwhile requests are refused, not queued.
        assert not engine.is_ready
        with pytest.raises(EngineDeadError, match="restarting"):
            asyncio.run(collect(engine, PROMPT, greedy(2)))
        wait_for(lambda: engine.is_ready, timeout_s=120)
        assert engine.core_pid != old_pid and engine.restarts == 1 and restarts == [1]
        tokens, _ = asyncio.run(collect(engine, PROMPT, greedy(4)))
        assert len(tokens) == 4
    finally:
        engine.shutdown()
    assert not engine.is_ready


def test_restarts_are_bounded(config):
    engine = AsyncEngine(
        config, restart_policy=RestartPolicy(max_attempts=0, backoff_s=0.01)
    )
    try:
        os.kill(engine.core_pid, signal.SIGKILL)
        wait_for(lambda: engine.dead_reason is not None, timeout_s=30)
        assert not engine.is_ready and engine.restarts == 0
        with pytest.raises(EngineDeadError, match="died"):
            asyncio.run(collect(engine, PROMPT, greedy(2)))
    finally:
        engine.shutdown()


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model"):
        AsyncEngine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))


# ----- stop strings, with a real tokenizer --------------------------------------------------


@pytest.fixture(scope="module")
def chat_config(tmp_path_factory) -> EngineConfig:
    from tests.tiny_chat_model import save_tiny_chat_model

    folder = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-async"))
    return EngineConfig(model=str(folder), device="cpu", dtype="float32", state_size=16,
                        max_num_seqs=4)


def test_stop_strings_end_choices_as_in_process(chat_config):
    """The front end finds stop strings and the core frees those slots: text, tokens and
    finish reasons equal the in-process engine's, for each of n choices."""
    in_process = LLMEngine(chat_config)
    plain = SamplingParams(n=2, seed=3, temperature=1.0, max_tokens=40, ignore_eos=True,
                           output_kind="delta")
    texts = run_in_process(in_process, "Once upon a time", plain)
    # A stop string each choice's text contains, somewhere in its middle.
    stop = [texts[i]["text"][10:12] for i in texts]
    params = SamplingParams(n=2, seed=3, temperature=1.0, max_tokens=40, ignore_eos=True,
                            stop=stop, output_kind="delta")
    expected = run_in_process(in_process, "Once upon a time", params)
    engine = AsyncEngine(chat_config)
    try:
        got = asyncio.run(run_async(engine, "Once upon a time", params))
        wait_for(lambda: engine.last_stats.slots_used == 0)
    finally:
        engine.shutdown()
    for index in expected:
        assert got[index]["finish"][0] == "stop" and got[index]["finish"][1] in stop
        for key in ("text", "tokens", "finish"):
            assert got[index][key] == expected[index][key]
        assert len(got[index]["tokens"]) < 40


def test_a_slow_reader_gets_every_token_before_a_failure():
    """Outputs that queue up while the reader is busy are merged into one; a failure behind
    them is not merged in (it is raised, and would take the tokens with it): the reader gets
    the tokens first, then the failure."""
    from tova_engine.frontend.async_engine import _Stream
    from tova_engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

    def output(tokens: list[int], error: str | None = None) -> RequestOutput:
        choice = CompletionOutput(0, "".join(f"<{t}>" for t in tokens), tokens, 0.0, None,
                                  "error" if error else None)
        return RequestOutput("r", None, [1], None, [choice], error is not None,
                             RequestMetrics(arrival_time=0.0), error)

    async def read_all() -> list[RequestOutput]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        for item in (output([5]), output([6]), output([7]), output([], "non-finite logits")):
            stream.queue.put_nowait(item)  # all there before the reader looks: a slow reader
        first = await stream.next(delta=True)
        assert first.error is None, "the failure was folded into the tokens before it"
        return [first, await asyncio.wait_for(stream.next(delta=True), 5)]

    tokens, failure = asyncio.run(read_all())
    assert tokens.outputs[0].token_ids == [5, 6, 7] and tokens.error is None
    assert tokens.outputs[0].text == "<5><6><7>"
    assert failure.error == "non-finite logits" and failure.outputs[0].token_ids == []
