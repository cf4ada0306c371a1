"""Prefill pacing: the prompt tokens of a step beside running decodes follow a step-time
target (core/prefill_pacer.py), and pacing never changes what a request generates."""

from __future__ import annotations

import random

import pytest

from tova_engine import LLM, EngineConfig, SamplingParams
from tova_engine.core.prefill_pacer import AUTO_RATIO, PrefillPacer

CHUNK = 512
CEILING = 8192
DECODE_S = 0.016  # a decode step of 256 rows of an 8B model on an H100
TOKEN_S = 20e-6  # one prompt token at ~50k tokens/s


def step_time(tokens: int, rng: random.Random) -> float:
    return (DECODE_S + TOKEN_S * tokens) * rng.uniform(0.95, 1.05)


def run(pacer: PrefillPacer, steps: int, rng: random.Random, prompt_lengths=None) -> list[int]:
    """Steps of 256 decodes that take whole chunks within the pacer's budget (as the scheduler
    does), prompts of random lengths always waiting; returns each step's prompt tokens."""
    waiting = [rng.choice(prompt_lengths or [2176, 640, 3000, 128]) for _ in range(64)]
    taken = []
    for _ in range(steps):
        budget = pacer.prompt_budget(256)
        tokens = 0
        for i, left in enumerate(waiting):
            length = min(CHUNK, left)
            if tokens + length > budget:
                continue
            tokens += length
            waiting[i] -= length
        waiting = [left for left in waiting if left > 0] + [
            rng.choice(prompt_lengths or [2176, 640, 3000, 128])
            for _ in range(64 - len([left for left in waiting if left > 0]))]
        pacer.observe(256, tokens, step_time(tokens, rng))
        taken.append(tokens)
    return taken


def test_a_fixed_target_sets_the_budget_from_the_fitted_step_cost():
    pacer = PrefillPacer(0.060, CHUNK, CEILING)
    taken = run(pacer, 200, random.Random(0))
    expected = (0.060 - DECODE_S) / TOKEN_S  # 2,200 tokens
    assert abs(pacer.budget - expected) < 0.1 * expected
    late = taken[-100:]
    assert max(late) <= pacer.budget + 1  # no step took more than it was given
    times = [DECODE_S + TOKEN_S * t for t in late]
    assert max(times) <= 0.060 * 1.1


def test_auto_targets_a_multiple_of_the_decode_step():
    pacer = PrefillPacer(None, CHUNK, CEILING)
    run(pacer, 200, random.Random(1))
    expected = (AUTO_RATIO - 1) * DECODE_S / TOKEN_S  # 1,600 tokens
    assert abs(pacer.budget - expected) < 0.1 * expected


def test_steps_that_prefill_alike_probe_until_a_fit_exists_then_keep_it():
    """Prompts of one chunk each and a budget of whole chunks: every step would prefill the
    same, leaving nothing to fit; the pacer alternates full and half budgets first."""
    pacer = PrefillPacer(0.060, CHUNK, 4096)
    rng = random.Random(2)
    taken = run(pacer, 6, rng, prompt_lengths=[512])
    assert set(taken[:4]) == {4096, 2048}
    taken = run(pacer, 100, rng, prompt_lengths=[512])
    assert set(taken[-50:]) == {2048}  # (0.060 - 0.016) / 20e-6 = 2,200 -> four chunks


def test_the_budget_stays_within_one_chunk_and_the_token_budget():
    slow = PrefillPacer(0.001, CHUNK, CEILING)  # below the decode step itself
    run(slow, 100, random.Random(3))
    assert slow.budget == CHUNK  # prompts still progress, a chunk a step
    lax = PrefillPacer(10.0, CHUNK, CEILING)
    run(lax, 100, random.Random(4))
    assert lax.budget == CEILING


def test_no_decodes_or_no_target_means_the_whole_budget():
    pacer = PrefillPacer(0.020, CHUNK, CEILING)
    run(pacer, 100, random.Random(5))
    assert pacer.prompt_budget(256) < CEILING
    assert pacer.prompt_budget(0) == CEILING  # nobody waits on a prefill-only step
    off = PrefillPacer(0, CHUNK, CEILING)
    assert not off.enabled
    run(off, 20, random.Random(6))
    assert off.prompt_budget(256) == CEILING


@pytest.mark.parametrize("value", [-1, float("inf"), "fast", True])
def test_bad_targets_are_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="target_itl_ms"):
        EngineConfig(target_itl_ms=value)


def test_the_flag_reads_milliseconds_or_auto():
    from server.cli import build_parser, configs

    parser = build_parser()
    assert configs(parser.parse_args([]))[0].target_itl_ms is None  # resolved by the device
    assert configs(parser.parse_args(["--target-itl-ms", "auto"]))[0].target_itl_ms == "auto"
    assert configs(parser.parse_args(["--target-itl-ms", "75"]))[0].target_itl_ms == 75.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--target-itl-ms", "soon"])


def test_paced_steps_generate_what_unpaced_ones_do(tiny_llama):
    """A target no step can meet paces prompts to one chunk a step beside the decodes; the
    chunks stay whole and on their grid, so every token and retained position is the same."""
    rng = random.Random(7)
    lengths = (9, 40, 33, 61, 27, 50, 45)
    prompts = [[rng.randrange(3, 96) for _ in range(n)] for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, return_state=True)
    common = dict(state_size=16, policy="tova", dtype="float64", device="cpu",
                  prefill_chunk_size=8, max_num_seqs=8, max_num_batched_tokens=40)
    paced = LLM(str(tiny_llama), target_itl_ms=1e-6, **common)
    beside_decodes = []  # prompt tokens of each step that also decoded
    scheduler = paced.engine.core.scheduler
    schedule = scheduler.schedule

    def recording():
        out = schedule()
        if out.decodes and out.prefills:
            beside_decodes.append(sum(c.length for c in out.prefills))
        return out

    scheduler.schedule = recording
    pacer = paced.engine.core.pacer
    observe = pacer.observe
    # Step times as a model of them, not the clock: a busy machine cannot blur the fit.
    pacer.observe = lambda decodes, tokens, _: observe(decodes, tokens, 0.01 + 1e-3 * tokens)
    outputs = paced.generate(prompts, params, use_tqdm=False)
    assert pacer.enabled
    # The first prompt decodes while the rest prefill; once the pacer has fitted the steps,
    # they prefill one chunk each beside the decodes.
    assert len(beside_decodes) > 6 and max(beside_decodes[4:]) <= 8
    assert max(beside_decodes) > 8  # before the fit, the whole budget (or half of it)
    unpaced = LLM(str(tiny_llama), target_itl_ms=0, **common)
    assert unpaced.engine.core.scheduler.pacer is None
    for paced_out, alone in zip(outputs, unpaced.generate(prompts, params, use_tqdm=False),
                                strict=True):
        assert paced_out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert paced_out.outputs[0].state_positions == alone.outputs[0].state_positions
