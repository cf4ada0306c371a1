"""Saved states: a conversation continued from a request's saved state equals one request over
the whole token stream (prefill chunks breaking at the same places); the state stays the
same size however long the conversation; only new tokens are prefilled; snapshots survive a
round trip through their files; a state is refused under another configuration."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import save_tiny_gemma3
from tova_engine import LLM, InvalidRequestError, SamplingParams, StateSnapshot

GREEDY = dict(temperature=0, ignore_eos=True)


def make_llm(model, policy: str, chunk: int, **extra) -> LLM:
    return LLM(
        str(model), state_size=8, policy=policy, dtype="float64", device="cpu",
        prefill_chunk_size=chunk, max_num_seqs=4, **extra,
    )


def tokens(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 96) for _ in range(count)]


def run(llm: LLM, prompt, max_tokens: int, resume=None, keep=True):
    params = SamplingParams(max_tokens=max_tokens, keep_state=keep, return_state=True, **GREEDY)
    return llm.generate([prompt], params, use_tqdm=False, resume_from=resume)[0]


def continued_turn(llm: LLM, stream: list[int], new: list[int], state, max_tokens: int):
    """One turn continued from `state`, checked against one request over everything said so
    far: the same tokens and retained positions. `stream` grows by the turn (in place);
    returns its output."""
    out = run(llm, new, max_tokens=max_tokens, resume=state)
    whole = run(llm, stream + new, max_tokens=max_tokens, keep=False)
    assert out.outputs[0].token_ids == whole.outputs[0].token_ids
    assert out.outputs[0].state_positions == whole.outputs[0].state_positions
    stream += new + out.outputs[0].token_ids
    return out


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
def test_three_turns_equal_one_request_over_the_whole_stream(tiny_llama, policy):
    """Token by token (chunk 1) every break is the same: turn after turn, the continued
    conversation's tokens and retained positions equal those of one request that reads
    everything said so far."""
    llm = make_llm(tiny_llama, policy, chunk=1)
    stream: list[int] = []
    state = None
    for turn in range(3):
        out = continued_turn(llm, stream, tokens(5 + turn, seed=turn), state, max_tokens=6)
        state = out.state
        assert state.num_tokens == len(stream)
        assert state.pending_token_ids == out.outputs[0].token_ids[-1:]


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
def test_chunked_continuation_equals_the_whole_stream_at_the_same_breaks(tiny_llama, policy):
    """Chunks of 4: turn 1 is 8 prompt tokens and one sampled token, turn 2 that token and 3
    more: the whole stream (12 tokens) chunks at 0, 4, 8 either way, with eviction."""
    llm = make_llm(tiny_llama, policy, chunk=4)
    first, second = tokens(8, 1), tokens(3, 2)
    turn1 = run(llm, first, max_tokens=1)
    turn2 = run(llm, second, max_tokens=5, resume=turn1.state)
    whole = run(llm, first + turn1.outputs[0].token_ids + second, max_tokens=5, keep=False)
    assert turn2.outputs[0].token_ids == whole.outputs[0].token_ids
    assert turn2.outputs[0].state_positions == whole.outputs[0].state_positions


def test_fifty_turns_keep_the_state_size_and_prefill_only_new_tokens(tiny_llama):
    prefilled: list[int] = []
    llm = make_llm(tiny_llama, "tova", chunk=4)
    llm.engine.stats_callback = lambda s: prefilled.append(s.prompt_tokens)
    state, sizes = None, set()
    for turn in range(50):
        new = tokens(3 + turn % 4, seed=100 + turn)
        prefilled.clear()
        out = run(llm, new, max_tokens=3, resume=state)
        # The new turn and the one token sampled last turn that the state had not read.
        assert sum(prefilled) == len(new) + (0 if state is None else 1), turn
        state = out.state
        if turn:  # the first turn's 6 tokens do not fill the 8 entries yet
            sizes.add((state.nbytes, tuple(tuple(layer.shape) for layer in state.k)))
    # Full: 8 entries in each layer whatever the length.
    assert sizes == {(state.nbytes, ((2, 8, 16), (2, 8, 16)))}
    assert state.num_tokens > 50 * 6
    assert llm.engine.slots_used == 0


def test_a_snapshot_survives_its_file(tiny_llama, tmp_path):
    llm = make_llm(tiny_llama, "h2o", chunk=3)
    turn1 = run(llm, tokens(9, 3), max_tokens=4)
    path = tmp_path / "state.safetensors"
    turn1.state.save(path, key="resp_1")
    loaded = StateSnapshot.load(path)
    assert loaded.spec == turn1.state.spec and loaded.num_seen == turn1.state.num_seen
    assert loaded.pending_token_ids == turn1.state.pending_token_ids
    for name in ("k", "v", "positions", "stats"):
        for got, want in zip(getattr(loaded, name), getattr(turn1.state, name), strict=True):
            assert torch.equal(got, want)
    follow = tokens(4, 5)
    from_memory = run(llm, follow, max_tokens=5, resume=turn1.state, keep=False)
    from_file = run(llm, follow, max_tokens=5, resume=loaded, keep=False)
    assert from_file.outputs[0].token_ids == from_memory.outputs[0].token_ids


def test_a_state_is_refused_under_another_configuration(tiny_llama):
    llm = make_llm(tiny_llama, "tova", chunk=4)
    state = run(llm, tokens(6, 1), max_tokens=2).state
    with pytest.raises(InvalidRequestError, match="state_size") as info:
        llm.generate([tokens(3, 2)], SamplingParams(max_tokens=2, state_size=6),
                     use_tqdm=False, resume_from=state)
    assert info.value.param == "resume_from"
    other = make_llm(tiny_llama, "window", chunk=4)
    with pytest.raises(InvalidRequestError, match="policy") as info:
        other.generate([tokens(3, 2)], SamplingParams(max_tokens=2), use_tqdm=False,
                       resume_from=state)
    assert info.value.param == "resume_from"
    assert other.engine.slots_used == 0 and not other.engine.has_unfinished_requests()


def test_bad_resume_input_names_its_parameter(tiny_llama):
    llm = make_llm(tiny_llama, "tova", chunk=4)
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(n=2, keep_state=True)
    assert info.value.param == "n"
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([tokens(3, 1)], SamplingParams(), use_tqdm=False, resume_from="resp_1")
    assert info.value.param == "resume_from"
    state = run(llm, tokens(6, 1), max_tokens=2).state
    with pytest.raises(InvalidRequestError) as info:  # positions past the length limit
        llm.generate([tokens(3, 2)], SamplingParams(max_tokens=1020), use_tqdm=False,
                     resume_from=state)
    assert info.value.param == "max_tokens"


def test_an_aborted_request_saves_no_state(tiny_llama):
    llm = make_llm(tiny_llama, "tova", chunk=4)
    engine = llm.engine
    params = SamplingParams(max_tokens=50, keep_state=True, **GREEDY)
    engine.add_request("gone", tokens(6, 1), params)
    engine.step()
    engine.step()
    final = engine.abort_request("gone")
    assert final.outputs[0].finish_reason == "abort" and final.state is None
    assert "gone" not in engine.core.store and engine.core.store.saved() == []


def test_gemma3_snapshots_hold_each_layers_own_entries(tmp_path):
    """Local layers (window 6: 5 entries) and global ones (8) snapshot their own counts; a
    continuation, from memory or from the file, equals one request over the whole stream."""
    llm = make_llm(save_tiny_gemma3(tmp_path / "gemma3", sliding_window=6), "tova", chunk=1)
    first, second = tokens(9, 11), tokens(4, 12)
    turn1 = run(llm, first, max_tokens=3)
    state = turn1.state
    assert [tuple(layer.shape) for layer in state.k] == [(2, 5, 16), (2, 8, 16)] * 2
    assert [len(p) for p in state.positions] == [5, 8, 5, 8] and state.num_entries == 8
    path = tmp_path / "state.safetensors"
    state.save(path)
    whole = run(llm, first + turn1.outputs[0].token_ids + second, max_tokens=5, keep=False)
    for resumed in (state, StateSnapshot.load(path)):
        out = run(llm, second, max_tokens=5, resume=resumed, keep=False)
        assert out.outputs[0].token_ids == whole.outputs[0].token_ids
        assert out.outputs[0].state_positions == whole.outputs[0].state_positions


def test_a_stop_string_keeps_the_state(tmp_path):
    """A choice a stop string ends still keeps its state (the core ends it as "stop", not as
    aborted), with the stop string as its reason; the state has read every token generated
    up to the stop, and the conversation continues from it as from any saved state."""
    from tests.tiny_chat_model import save_tiny_chat_model

    model = save_tiny_chat_model(tmp_path)
    llm = LLM(str(model), state_size=16, dtype="float64", device="cpu", max_num_seqs=2)
    free = llm.generate(["Hello there"], SamplingParams(max_tokens=12, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    stop = free.text[len(free.text) // 2:][:2]
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=12, stop=[stop],
                                                       keep_state=True, **GREEDY),
                       use_tqdm=False)[0]
    choice = out.outputs[0]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop)
    assert out.state is not None
    generated = len(choice.token_ids)
    assert out.state.num_seen == len(out.prompt_token_ids) + generated - 1  # last is pending
    assert out.state.pending_token_ids == [choice.token_ids[-1]]
    again = llm.generate([[5, 6]], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False,
                         resume_from=out.state)[0]
    assert len(again.outputs[0].token_ids) == 3
