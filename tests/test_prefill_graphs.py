"""Prefill chunk groups replayed from graphs (`prefill_graphs.py`) leave every sequence exactly
as the eager forward does: rows padded to a power of two on the spare slot, static inputs
refilled each replay, evicted ages of the real rows only, shapes captured on their second
sight and the least recently used dropped. On CPU the "graph" is the same padded forward run
eagerly; the CUDA capture itself is checked in test_gpu.py."""

from __future__ import annotations

import random

import pytest

from tova_engine import LLM, SamplingParams
from tova_engine.execution.prefill_graphs import ChunkShape, PrefillGraphs
from tova_engine.execution.runner import ModelRunner
from tova_engine.state.kv_state import KVState

GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True, return_state=True)


def make_llm(model, policy: str) -> LLM:
    return LLM(
        str(model), state_size=8, policy=policy, dtype="float64", device="cpu",
        prefill_chunk_size=5, max_num_seqs=8,
    )


def use_prefill_graphs(llm: LLM, **options) -> PrefillGraphs:
    """Give the engine a state with a spare slot and a runner that replays prefill groups."""
    worker = llm.engine.core.executor.worker
    config = worker.config
    state = KVState(
        worker.model_config, config.max_num_seqs, config.state_size, config.torch_dtype,
        config.torch_device, track_stats=worker.policy.uses_stats, pad_slot=True,
    )
    graphs = PrefillGraphs(worker.model, state, worker.policy, replay="eager", **options)
    old = worker.runner
    worker.state = state
    worker.runner = ModelRunner(
        worker.model, state, worker.policy, old.sampler, worker.eos_token_ids,
        prefill_graphs=graphs,
    )
    return graphs


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(length)] for _ in range(count)]


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
def test_replayed_prefill_equals_eager(tiny_llama, policy):
    eager, replayed = make_llm(tiny_llama, policy), make_llm(tiny_llama, policy)
    graphs = use_prefill_graphs(replayed)
    # Prompts of 22 tokens over an 8-entry state: chunks at 0, 5, 10, 15 (evicting from the
    # second on) and a last one of 2; groups of 3 rows are padded to 4.
    rounds = [prompts(3, 22, seed) for seed in range(3)] + [prompts(2, 13, 9)]
    params = SamplingParams(**GREEDY)
    for batch in rounds:
        want = eager.generate(batch, params, use_tqdm=False)
        got = replayed.generate(batch, params, use_tqdm=False)
        for a, b in zip(want, got, strict=True):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids
            assert b.outputs[0].state_positions == a.outputs[0].state_positions
    assert graphs.captures > 0 and graphs.replays > graphs.captures
    # 3 rows padded to 4; the chunks at 10 and 15 (a full state, evicting) share one graph.
    assert ChunkShape(4, 8, 5, 8) in graphs.shapes()
    assert ChunkShape(4, 5, 5, 8) in graphs.shapes()


def test_evicted_ages_are_the_real_rows_only(tiny_llama):
    """The step's eviction statistics (what /metrics reports) are the same either way."""
    eager, replayed = make_llm(tiny_llama, "tova"), make_llm(tiny_llama, "tova")
    use_prefill_graphs(replayed, min_uses=1)
    ages: dict[str, list[int]] = {"eager": [], "replayed": []}
    for name, llm in (("eager", eager), ("replayed", replayed)):
        llm.engine.stats_callback = lambda s, name=name: ages[name].extend(s.evicted_ages)
        llm.generate(prompts(3, 17, seed=4), SamplingParams(**GREEDY), use_tqdm=False)
    assert ages["replayed"] and sorted(ages["replayed"]) == sorted(ages["eager"])


def test_shapes_are_captured_on_second_sight_and_least_recently_used_go(tiny_llama):
    llm = make_llm(tiny_llama, "tova")
    graphs = use_prefill_graphs(llm, max_graphs=2)
    params = SamplingParams(**GREEDY)
    llm.generate(prompts(1, 3, 1), params, use_tqdm=False)
    assert len(graphs) == 0  # seen once
    llm.generate(prompts(1, 3, 2), params, use_tqdm=False)
    assert graphs.shapes() == [ChunkShape(1, 0, 3, 8)]
    for seed in range(2):  # a second shape (2 rows of 4 tokens), then a third
        llm.generate(prompts(2, 4, seed), params, use_tqdm=False)
    llm.generate(prompts(1, 3, 3), params, use_tqdm=False)  # the first is used again
    for seed in range(2):
        llm.generate(prompts(1, 2, seed), params, use_tqdm=False)
    assert graphs.shapes() == [ChunkShape(1, 0, 3, 8), ChunkShape(1, 0, 2, 8)]


def test_the_grid_captured_at_start_serves_every_full_chunk(tiny_llama):
    """capture_grid takes the full chunks' shapes (1, 2, 4 rows; before the state holds 5, 8
    entries) ahead of the traffic: long prompts then capture nothing more, whatever their
    start, and replay what the eager forward computes."""
    eager, replayed = make_llm(tiny_llama, "tova"), make_llm(tiny_llama, "tova")
    graphs = use_prefill_graphs(replayed, min_uses=1, max_graphs=32)
    assert graphs.capture_grid(chunk_size=5, token_budget=20, capacity=8) == 9
    assert ChunkShape(4, 8, 5, 8) in graphs.shapes() and ChunkShape(1, 0, 5, 8) in graphs.shapes()
    params = SamplingParams(**GREEDY)
    batch = prompts(3, 30, seed=5)  # six full chunks each, at 0 to 25
    want = eager.generate(batch, params, use_tqdm=False)
    got = replayed.generate(batch, params, use_tqdm=False)
    for a, b in zip(want, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].state_positions == a.outputs[0].state_positions
    assert graphs.captures == 9 and graphs.replays >= 6


def test_the_grid_takes_at_most_half_of_the_graphs(tiny_llama):
    graphs = use_prefill_graphs(make_llm(tiny_llama, "tova"), max_graphs=4)
    assert graphs.capture_grid(chunk_size=5, token_budget=20, capacity=8) == 2
    # The largest are kept: 4 rows on a full state, then 4 rows before it is.
    assert sorted(graphs.shapes()) == [ChunkShape(4, 5, 5, 8), ChunkShape(4, 8, 5, 8)]


def test_chunks_that_want_prompt_logprobs_run_eagerly(tiny_llama):
    llm = make_llm(tiny_llama, "tova")
    graphs = use_prefill_graphs(llm, min_uses=1)
    params = SamplingParams(prompt_logprobs=1, **GREEDY)
    out = llm.generate(prompts(2, 4, 1), params, use_tqdm=False)
    assert graphs.replays == 0
    assert all(len(o.prompt_logprobs) == 4 for o in out)


def test_a_state_without_a_spare_slot_is_refused(tiny_llama):
    worker = make_llm(tiny_llama, "tova").engine.core.executor.worker
    with pytest.raises(ValueError, match="spare slot"):
        PrefillGraphs(worker.model, worker.state, worker.policy, replay="eager")


def test_max_captured_tokens_bounds_what_is_captured(tiny_llama):
    llm = make_llm(tiny_llama, "tova")
    graphs = use_prefill_graphs(llm, min_uses=1, max_captured_tokens=8)
    llm.generate(prompts(3, 4, 1), SamplingParams(**GREEDY), use_tqdm=False)  # 4 x 4 > 8
    assert len(graphs) == 0 and graphs.replays == 0
