"""A decode step's host work must not grow with the tokens a sequence has generated: with
penalties and log-probs on, step 3,000 costs what step 200 costs (CPU, tiny random Llama).

Steps are timed in CPU time of the stepping thread (`time.thread_time`, torch on one thread so
its work runs there), not wall time: on a loaded 2-core box a process is preempted in about
half of its 2 ms steps, and wall-time medians of two identical engines then differ by 0.4-1.8x.
"""

from __future__ import annotations

import random
import statistics
import time

import pytest
import torch

from tests.server_utils import tiny_config
from tova_engine import LLMEngine
from tova_engine.config import EngineConfig
from tova_engine.sampling_params import SamplingParams

# Large enough that a per-step [B, V] rebuild from the token lists would show, small enough
# that a step stays cheap.
VOCAB = 4096
EARLY = 200  # steps 200-300 against steps 3,000-3,100
LATE = 3_000
WINDOW = 100
TOLERANCE = 1.25
PROMPTS = [[5, 9, 17, 5, 300], [7, 7, 1000, 42]]


def timed_steps(engine: LLMEngine, params: SamplingParams, count: int) -> list[float]:
    """CPU seconds of each of `count` engine steps; the first call adds the requests (the one
    place that drives the engine)."""
    if not engine.has_unfinished_requests():
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, params)
    times = []
    for _ in range(count):
        start = time.thread_time()
        engine.step()
        times.append(time.thread_time() - start)
    return times


@pytest.fixture
def one_thread():
    """One torch thread: all of a step's work on the thread whose CPU time is measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("output_kind", ["delta", "final"])
def test_decode_step_time_does_not_grow_with_output(tmp_path, one_thread, output_kind):
    config = EngineConfig(
        model=str(tiny_config(tmp_path, VOCAB)), load_format="dummy", device="cpu", dtype="float32",
        state_size=16, max_num_seqs=4,
    )
    params = SamplingParams(
        n=2, max_tokens=LATE + WINDOW + 100, ignore_eos=True, temperature=0.8,
        repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2, logprobs=2,
        output_kind=output_kind,
    )
    old, young = LLMEngine(config), LLMEngine(config)
    timed_steps(old, params, LATE)
    timed_steps(young, params, EARLY)
    # Two identical engines stepped in turn, in a random order each round: the windows share
    # the machine's state (caches, clock), and a periodic disturbance cannot land on one
    # engine's steps only.
    engines, times = (young, old), ([], [])
    rounds = random.Random(0)
    for _ in range(WINDOW):
        for i in rounds.sample(range(2), 2):
            times[i].extend(timed_steps(engines[i], params, 1))
    early, late = times
    assert old.has_unfinished_requests()  # still decoding: `late` timed full batches
    early_ms, late_ms = statistics.median(early) * 1e3, statistics.median(late) * 1e3
    assert late_ms <= TOLERANCE * early_ms, (
        f"median step CPU time {early_ms:.2f} ms at steps {EARLY}-{EARLY + WINDOW}, "
        f"{late_ms:.2f} ms at {LATE}-{LATE + WINDOW}"
    )
