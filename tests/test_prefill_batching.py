"""Prefill chunks of several sequences at the same point of their prompts run in one batched
forward; it must leave every sequence exactly as running its chunks alone would."""

from __future__ import annotations

import random

import pytest

from tests.conftest import save_tiny_gemma3
from tova_engine import LLM, SamplingParams
from tova_engine.execution import runner as runner_module


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(length)] for _ in range(count)]


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
def test_batched_chunks_equal_chunks_alone(tiny_llama, policy, monkeypatch):
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
    chunk_groups = runner_module._chunk_groups

    def recording(chunks):
        found = chunk_groups(chunks)
        groups.extend(len(group) for group in found)
        return found

    monkeypatch.setattr(runner_module, "_chunk_groups", recording)
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


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("gemma"))


@pytest.mark.parametrize("policy", ["tova", "h2o", "window"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_a_packed_step_equals_its_forwards_run_apart(request, model, policy):
    """Decode rows, one-token chunks and chunk groups at different points of their prompts
    share one forward (attention/packed.py); every token, retained position and evicted age
    is what one forward per part gives."""
    packed = compare_packed(request.getfixturevalue(model), policy,
                            dict(dtype="float64", device="cpu"))
    assert max(packed) >= 2  # groups at different points of their prompts shared a forward


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [0, 16])
@pytest.mark.parametrize("policy", ["tova", "h2o"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_cuda_packed_step_equals_its_forwards_run_apart(request, model, policy, graphs):
    """On CUDA, float32: the decode rows run the fused kernels inside the packed forward
    (and with prefill graphs, groups whose shape recurs replay beside it)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    compare_packed(request.getfixturevalue(model), policy,
                   dict(dtype="float32", device="cuda", max_prefill_graphs=graphs), 1e-4)


def compare_packed(folder, policy: str, options: dict, tolerance: float = 1e-9) -> list[int]:
    """Runs the workload packed and apart; returns the chunk groups of each packed forward."""
    rng = random.Random(3)
    lengths = [1, 5, 17, 23, 40, 12, 33, 64]
    inputs = [[rng.randrange(3, 96) for _ in range(n)] for n in lengths]
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, return_state=True,
                             logprobs=2, state_size=6 if i == 3 else None)
              for i in range(len(lengths))]
    packed_forwards: list[int] = []
    results = {}
    for pack in (True, False):
        llm = LLM(str(folder), state_size=10, policy=policy, prefill_chunk_size=5,
                  max_num_seqs=8, max_num_batched_tokens=24, **options)
        runner = llm.engine.core.executor.worker.runner
        runner.pack_steps = pack
        if pack:
            run_packed = runner._run_packed

            def recording(decodes, single, groups, step, run_packed=run_packed):
                packed_forwards.append(len(groups))
                return run_packed(decodes, single, groups, step)

            runner._run_packed = recording
        ages: list[int] = []
        llm.engine.stats_callback = lambda stats, ages=ages: ages.extend(stats.evicted_ages)
        outs = llm.generate(inputs, params, use_tqdm=False)
        results[pack] = outs, sorted(ages)
    assert packed_forwards
    (packed, packed_ages), (apart, apart_ages) = results[True], results[False]
    assert packed_ages == apart_ages
    for one, other in zip(packed, apart, strict=True):
        one, other = one.outputs[0], other.outputs[0]
        assert one.token_ids == other.token_ids
        assert one.state_positions == other.state_positions
        for mine, theirs in zip(one.logprobs, other.logprobs, strict=True):
            # The same sums in another matmul shape: equal to the dtype's rounding.
            assert mine.keys() == theirs.keys()
            assert all(abs(mine[t].logprob - theirs[t].logprob) < tolerance for t in mine)
    return packed_forwards
