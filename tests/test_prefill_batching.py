"""Prefill chunks of several sequences at the same point of their prompts run in one batched
forward; it must leave every sequence exactly as running its chunks alone would."""

from __future__ import annotations

import random

import pytest

from tova_engine import LLM, SamplingParams


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(length)] for _ in range(count)]


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
def test_batched_chunks_equal_chunks_alone(tiny_llama, policy):
    llm = LLM(
        str(tiny_llama),
        state_size=8,
        policy=policy,
        dtype="float64",
        device="cpu",
        prefill_chunk_size=5,
        max_num_seqs=8,
    )
    groups: list[int] = []
    run_chunks = llm.engine.core.executor.worker.runner._run_chunks

    def recording(chunks, step):
        groups.append(len(chunks))
        return run_chunks(chunks, step)

    llm.engine.core.executor.worker.runner._run_chunks = recording
    same_length = prompts(5, 22, seed=1)
    greedy = dict(temperature=0, max_tokens=10, ignore_eos=True, return_state=True)
    # A smaller per-request state, and a prompt of another length: not batched with the rest.
    params = [SamplingParams(**greedy)] * 4 + [SamplingParams(state_size=6, **greedy)] * 2
    inputs = [*same_length, same_length[0][:17]]
    together = llm.generate(inputs, params, use_tqdm=False)
    assert max(groups) == 4  # the four equal prompts of equal capacity shared their forwards
    for prompt, param, out in zip(inputs, params, together, strict=True):
        alone = llm.generate([prompt], param, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.outputs[0].state_positions == alone.outputs[0].state_positions
