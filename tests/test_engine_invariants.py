"""Invariants of the bounded state and the continuous-batching scheduler."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import save_tiny_gemma3
from tests.test_correctness import PROMPT
from tova_engine import LLM, EngineConfig, LLMEngine, SamplingParams


def make_engine(model_dir, **options) -> LLMEngine:
    settings = dict(
        model=str(model_dir),
        dtype="float64",
        device="cpu",
        state_size=8,
        max_num_seqs=6,
        prefill_chunk_size=4,
    )
    settings.update(options)
    return LLMEngine(EngineConfig(**settings))


def run_to_completion(engine: LLMEngine, check=None) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if check:
            check(engine)
    return finished


def check_slots_and_rows(engine: LLMEngine) -> None:
    """No slot shared by two live sequences; no row holds more than its capacity."""
    live = [seq for r in engine.core.scheduler.running for seq in r.live_sequences()]
    slots = [seq.slot for seq in live]
    assert len(slots) == len(set(slots)), slots
    assert all(s >= 0 for s in slots)
    assert not set(slots) & set(engine.core.scheduler.free_slots)
    state = engine.core.executor.worker.state
    for request in engine.core.scheduler.running:
        for seq in request.live_sequences():
            # The host-side counters the runner sizes attention with match the device's.
            fed = (
                request.num_computed
                if request.prefilling
                else (request.prompt_len + len(seq.output_token_ids) - 1)
            )
            if seq is request.leader or not request.prefilling:
                assert int(state.num_seen[seq.slot]) == fed
                assert int(state.num_entries[seq.slot]) == min(fed, request.capacity)
    assert bool((state.num_entries <= state.capacity).all())
    assert bool((state.capacity <= state.state_size).all())


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)


def test_constant_memory_over_long_generation(tiny_llama):
    engine = make_engine(tiny_llama, state_size=16)
    state = engine.core.executor.worker.state
    buffers = [(t.data_ptr(), t.shape) for t in (*state.k, *state.v)]
    total = state.total_bytes()
    engine.add_request("long", PROMPT, greedy(8 * 16, return_state=True))
    out = run_to_completion(engine, check_slots_and_rows)["long"].outputs[0]
    assert len(out.token_ids) == 8 * 16
    state = engine.core.executor.worker.state
    assert [(t.data_ptr(), t.shape) for t in (*state.k, *state.v)] == buffers
    assert state.total_bytes() == total
    assert all(len(layer) == 16 for layer in out.state_positions)
    # layers, kv heads, head_dim, S, float64
    assert engine.info.state_bytes_per_sequence == 2 * 2 * 2 * 16 * 16 * 8


def test_gemma3_local_layers_hold_their_window_in_smaller_buffers(tmp_path, caplog):
    """Window 6 against S = 16: local layers' buffers hold 5 entries + the spare one, and
    after 8 x S tokens each holds the latest 5 positions while global layers hold 16; the
    saving is what the engine reports and logs."""
    with caplog.at_level("INFO", logger="tova_engine"):
        engine = make_engine(save_tiny_gemma3(tmp_path / "gemma3", sliding_window=6),
                             state_size=16)
    state = engine.core.executor.worker.state
    assert [k.shape[2] for k in state.k] == [6, 17, 6, 17]
    engine.add_request("long", PROMPT, greedy(8 * 16, return_state=True))
    out = run_to_completion(engine, check_slots_and_rows)["long"].outputs[0]
    fed = len(PROMPT) + 8 * 16 - 1
    assert out.state_positions[0] == out.state_positions[2] == list(range(fed - 5, fed))
    assert [len(layer) for layer in out.state_positions] == [5, 16, 5, 16]
    entry = 2 * 2 * 16 * 8  # K and V of 2 kv heads of 16, float64
    info = engine.info
    assert info.state_bytes_by_layer_kind == {"global": 2 * 16 * entry, "local": 2 * 5 * entry}
    assert info.state_bytes_saved_per_sequence == 2 * 11 * entry
    assert info.state_bytes_per_sequence == 2 * 21 * entry
    assert any(r.getMessage().startswith("2 of 4 layers are sliding-window (window 6): their "
                                         "state holds 5 entries") for r in caplog.records)


def test_batching_invariance_with_requests_joining_and_leaving(tiny_llama):
    alone = make_engine(tiny_llama)
    alone.add_request("a", PROMPT, greedy(24))
    expected = run_to_completion(alone)["a"].outputs[0].token_ids

    engine = make_engine(tiny_llama)
    engine.add_request("short", PROMPT[:5], greedy(3))
    engine.add_request("a", PROMPT, greedy(24))
    engine.add_request("b", PROMPT[::-1], greedy(6))
    finished = {}
    for step in range(200):
        if step == 4:
            engine.add_request("late", PROMPT[3:15], greedy(9))
        if step == 9:
            engine.add_request("later", [4, 5, 6], SamplingParams(max_tokens=5, seed=3))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        check_slots_and_rows(engine)
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == {"short", "a", "b", "late", "later"}
    assert finished["a"].outputs[0].token_ids == expected


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_window_and_sink_keep_the_right_positions(tiny_llama, chunk):
    llm = LLM(
        str(tiny_llama),
        state_size=8,
        policy="window",
        dtype="float64",
        device="cpu",
        prefill_chunk_size=chunk,
    )
    out = llm.generate([PROMPT], greedy(5, return_state=True), use_tqdm=False)[0].outputs[0]
    seen = len(PROMPT) + 5 - 1  # the last sampled token is never fed back
    assert out.state_positions == [list(range(seen - 8, seen))] * 2

    llm = LLM(
        str(tiny_llama),
        state_size=8,
        policy="sink",
        dtype="float64",
        device="cpu",
        prefill_chunk_size=chunk,
    )
    out = llm.generate([PROMPT], greedy(5, return_state=True), use_tqdm=False)[0].outputs[0]
    assert out.state_positions == [[0, 1, 2, 3, *range(seen - 4, seen)]] * 2


def test_h2o_keeps_recent_half_and_tova_differs_from_window(tiny_llama):
    results = {}
    for policy in ("h2o", "tova", "window"):
        llm = LLM(
            str(tiny_llama),
            state_size=8,
            policy=policy,
            dtype="float64",
            device="cpu",
            prefill_chunk_size=1,
        )
        out = llm.generate([PROMPT], greedy(6, return_state=True), use_tqdm=False)[0]
        results[policy] = out.outputs[0].state_positions
    seen = len(PROMPT) + 6 - 1
    for layer in results["h2o"]:
        assert len(layer) == 8
        assert set(range(seen - 4, seen)) <= set(layer)
    assert results["tova"] != results["window"]


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
def test_invariants_per_policy_under_mixed_load(tiny_llama, policy):
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=3)
    for i in range(7):
        prompt = PROMPT[i : i + 3 + 2 * i]
        params = greedy(4 + i, state_size=4 + i % 5, return_state=True)
        engine.add_request(f"r{i}", prompt, params)
    finished = run_to_completion(engine, check_slots_and_rows)
    assert len(finished) == 7
    for i in range(7):
        out = finished[f"r{i}"].outputs[0]
        assert len(out.token_ids) == 4 + i
        for layer in out.state_positions:
            assert len(layer) <= 4 + i % 5
            assert len(set(layer)) == len(layer)
    assert len(engine.core.scheduler.free_slots) == 3


def test_per_request_state_size_matches_engine_of_that_size(tiny_llama):
    small = make_engine(tiny_llama, state_size=5)
    small.add_request("x", PROMPT, greedy(8, return_state=True))
    expected = run_to_completion(small)["x"].outputs[0]
    big = make_engine(tiny_llama, state_size=12)
    big.add_request("x", PROMPT, greedy(8, state_size=5, return_state=True))
    got = run_to_completion(big)["x"].outputs[0]
    assert got.token_ids == expected.token_ids
    assert got.state_positions == expected.state_positions


def test_n_choices_share_prefill_and_differ(tiny_llama):
    llm = LLM(str(tiny_llama), state_size=8, dtype="float64", device="cpu", max_num_seqs=4)
    params = SamplingParams(n=3, max_tokens=12, seed=7, temperature=1.0, ignore_eos=True)
    first = llm.generate([PROMPT], params, use_tqdm=False)[0]
    again = llm.generate([PROMPT], params, use_tqdm=False)[0]
    texts = [o.token_ids for o in first.outputs]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert texts == [o.token_ids for o in again.outputs]  # seeded: reproducible
    assert len({tuple(t) for t in texts}) == 3
    assert len(llm.engine.core.scheduler.free_slots) == 4


def test_abort_frees_slot_at_once(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=2)
    engine.add_request("a", PROMPT, greedy(50))
    engine.add_request("b", PROMPT, greedy(50))
    engine.add_request("c", PROMPT, greedy(3))
    engine.step()
    assert engine.num_waiting == 1
    out = engine.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.slots_used == 1
    engine.step()
    assert engine.num_waiting == 0 and engine.slots_used == 2


def test_failing_request_fails_alone(tiny_llama):
    def poison(token_ids, logits):
        return torch.full_like(logits, float("nan")) if len(token_ids) >= 2 else logits

    llm = LLM(str(tiny_llama), state_size=8, dtype="float64", device="cpu")
    bad = SamplingParams(max_tokens=6, logits_processors=[poison])
    outs = llm.generate([PROMPT, PROMPT], [bad, greedy(6)], use_tqdm=False)
    assert outs[0].error and outs[0].outputs[0].finish_reason == "error"
    assert len(outs[0].outputs[0].token_ids) == 2
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 6
    again = llm.generate([PROMPT], greedy(6), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_stop_conditions(tiny_llama):
    llm = LLM(str(tiny_llama), state_size=8, dtype="float64", device="cpu")
    base = llm.generate([PROMPT], greedy(10), use_tqdm=False)[0].outputs[0].token_ids
    stop_id = base[4]
    out = llm.generate([PROMPT], greedy(10, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    first = base.index(stop_id)
    assert out.outputs[0].token_ids == base[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    out = llm.generate(
        [PROMPT], greedy(10, stop_token_ids=[stop_id], min_tokens=first + 2), use_tqdm=False
    )[0]
    assert stop_id not in out.outputs[0].token_ids[: first + 2]
    out = llm.generate([PROMPT], greedy(7), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7


@pytest.mark.parametrize(
    "options,match",
    [
        ({"policy": "lru"}, "policy"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": "float16"}, "dtype"),
        ({"state_size": 0}, "state_size"),
        ({"state_size": 5000}, "state_size"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"prefill_chunk_size": -1}, "prefill_chunk_size"),
        ({"device": "tpu"}, "device"),
        ({"load_format": "pickle"}, "load_format"),
    ],
)
def test_bad_engine_options(tiny_llama, options, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_llama), device=options.pop("device", "cpu"), **options)


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ([], SamplingParams(), "prompt"),
        ("", SamplingParams(), "prompt"),
        ([1, 2, 96], SamplingParams(), "token ids"),
        ([1, -1], SamplingParams(), "token ids"),
        ([1, 2], SamplingParams(state_size=9), "state_size"),
        ([1, 2], SamplingParams(max_tokens=1023), "max_tokens"),
        ([1, 2], SamplingParams(n=7), "n"),
    ],
)
def test_bad_requests(tiny_llama, prompt, params, match):
    engine = make_engine(tiny_llama)
    with pytest.raises(ValueError, match=match):
        engine.add_request("x", prompt, params)
    assert not engine.has_unfinished_requests()


def test_full_policy_refuses_overflow(tiny_llama):
    engine = make_engine(tiny_llama, policy="full", state_size=16)
    with pytest.raises(ValueError, match="state_size"):
        engine.add_request("x", PROMPT, SamplingParams(max_tokens=1))
    engine.add_request("ok", PROMPT[:10], greedy(6))
    # No max_tokens: as many as the state holds, not a refusal.
    engine.add_request("fill", PROMPT[:10], greedy(None))
    finished = run_to_completion(engine)
    assert len(finished["ok"].outputs[0].token_ids) == 6
    assert len(finished["fill"].outputs[0].token_ids) == 16 - 10
