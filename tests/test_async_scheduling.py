"""Async scheduling: the core launches step N+1 before it reads step N back. Everything a
caller sees must equal the synchronous engine's, token for token."""

from __future__ import annotations

import pytest
import torch

from tests.test_correctness import PROMPT
from tova_engine import LLM, EngineConfig, SamplingParams
from tova_engine.execution.executor import resolve_device
from tova_engine.frontend.llm_engine import LLMEngine

PROMPTS = [PROMPT, PROMPT[:5], PROMPT[3:17], [7], PROMPT * 2]


def llm(tiny_llama, overlap: bool, **options) -> LLM:
    settings = dict(state_size=8, policy="tova", dtype="float64", device="cpu",
                    max_num_seqs=4, prefill_chunk_size=4)
    settings.update(options)
    return LLM(str(tiny_llama), async_scheduling=overlap, **settings)


def mixed_params() -> list[SamplingParams]:
    """Greedy, seeded sampling with n > 1, penalties, min_tokens against EOS, a stop token,
    prompt log-probs: the features whose host bookkeeping could lag a step."""
    return [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=2),
        SamplingParams(n=2, seed=5, temperature=0.9, top_p=0.9, max_tokens=9),
        SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3,
                       frequency_penalty=0.5, presence_penalty=0.2),
        SamplingParams(temperature=0, max_tokens=6, min_tokens=4, prompt_logprobs=1),
        SamplingParams(temperature=0.7, seed=1, max_tokens=20, stop_token_ids=[37, 50]),
    ]


def summary(outputs) -> list:
    """Tokens, finish reasons and log-probs; log-probs rounded, because a batch made of other
    rows may round differently in the last bits (float64: 1e-15)."""

    def position(entries) -> list:
        return sorted((t, round(lp.logprob, 9), lp.rank) for t, lp in entries.items())

    return [
        (o.prompt_logprobs and [position(p) if p else None for p in o.prompt_logprobs],
         [(c.token_ids, c.finish_reason, c.stop_reason,
           [position(pos) for pos in c.logprobs or []])
          for c in o.outputs])
        for o in outputs
    ]


@pytest.mark.parametrize("policy", ["tova", "h2o", "window"])
def test_overlapped_steps_give_the_same_outputs(tiny_llama, policy):
    sync = llm(tiny_llama, False, policy=policy).generate(PROMPTS, mixed_params(), use_tqdm=False)
    overlapped = llm(tiny_llama, True, policy=policy).generate(
        PROMPTS, mixed_params(), use_tqdm=False)
    assert summary(overlapped) == summary(sync)


def test_more_requests_than_slots_join_and_leave(tiny_llama):
    prompts = [PROMPT[i:] for i in range(12)]
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 5, ignore_eos=True)
              for i in range(12)]
    sync = llm(tiny_llama, False, max_num_seqs=3).generate(prompts, params, use_tqdm=False)
    overlapped = llm(tiny_llama, True, max_num_seqs=3).generate(prompts, params, use_tqdm=False)
    assert summary(overlapped) == summary(sync)


def test_return_state_and_processors_are_exact(tiny_llama):
    seen: list[int] = []

    def count_tokens(token_ids, logits):  # reads the list: it must be complete
        seen.append(len(token_ids))
        return logits

    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, return_state=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                             logits_processors=[count_tokens])]
    sync = llm(tiny_llama, False).generate(PROMPTS[:2], params, use_tqdm=False)
    sync_seen, seen[:] = list(seen), []
    overlapped = llm(tiny_llama, True).generate(PROMPTS[:2], params, use_tqdm=False)
    assert seen == sync_seen == list(range(10))
    assert [o.outputs[0].state_positions for o in overlapped] == [
        o.outputs[0].state_positions for o in sync]
    assert summary(overlapped) == summary(sync)


def test_no_slot_is_shared_and_aborts_free_slots(tiny_llama):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float64",
                                    state_size=8, max_num_seqs=3, async_scheduling=True))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, output_kind="delta")
    for i in range(6):
        engine.add_request(str(i), PROMPT[i:], params)
    tokens: dict[str, list[int]] = {}
    for step in range(200):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        running = [seq for r in engine.core.scheduler.running for seq in r.live_sequences()]
        slots = [seq.slot for seq in running]
        assert len(slots) == len(set(slots)) and -1 not in slots
        assert not set(slots) & set(engine.core.scheduler.free_slots)
        if step == 5:
            engine.abort_request("1")
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests() and engine.slots_used == 0
    assert all(len(tokens[str(i)]) == 40 for i in (0, 2, 3, 4, 5))
    assert len(tokens.get("1", [])) < 40


def test_default_is_on_for_cuda_only():
    assert resolve_device(EngineConfig(device="cpu")).async_scheduling is False
    assert resolve_device(EngineConfig(device="cpu", async_scheduling=True)).async_scheduling
    if torch.cuda.is_available():
        assert resolve_device(EngineConfig(device="cuda")).async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_overlapped_steps_on_cuda_with_graphs(tiny_llama, policy):
    """The CUDA path: decode rows read their input from the device, CUDA graphs replay."""
    options = dict(policy=policy, device="cuda", dtype="float32", max_num_seqs=4)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)] * 3
    params += [SamplingParams(n=2, seed=2, temperature=0.8, max_tokens=16)]
    prompts = PROMPTS[:4]
    sync = llm(tiny_llama, False, **options).generate(prompts, params, use_tqdm=False)
    overlapped = llm(tiny_llama, True, **options).generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in overlapped] == [
        [c.token_ids for c in o.outputs] for o in sync]
