"""CUDA graph replay against eager execution, and the step's host synchronisations (CUDA;
skipped without it)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import save_tiny_gemma3
from tests.test_correctness import PROMPT
from tova_engine import LLM, EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.gpu
PROMPTS = [PROMPT, PROMPT[::-1], PROMPT[:5]]


def run(model, *, enforce_eager, **options):
    settings = dict(state_size=8, device="cuda", max_num_seqs=4, prefill_chunk_size=3)
    settings.update(options)
    llm = LLM(str(model), enforce_eager=enforce_eager, **settings)
    assert (llm.engine.core.executor.worker.runner.graphs is None) == enforce_eager
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, return_state=True
    )
    return llm.generate(PROMPTS, params, use_tqdm=False)


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_eager(tiny_llama, policy, dtype):
    """Every batch size a step sees has its own graph: replay runs the very same kernels on
    the very same shapes as eager execution, so results agree to the bit."""
    options = dict(policy=policy, dtype=dtype, cuda_graph_batch_sizes=(1, 2, 3, 4))
    eager = run(tiny_llama, enforce_eager=True, **options)
    graphs = run(tiny_llama, enforce_eager=False, **options)
    for a, b in zip(eager, graphs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].state_positions == b.outputs[0].state_positions
        assert [list(p.items()) for p in a.outputs[0].logprobs] == [
            list(p.items()) for p in b.outputs[0].logprobs
        ]


@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_gemma3_graph_replay_equals_eager(tmp_path, policy):
    """Gemma 3's local layers have smaller buffers (window 6: 5 entries of the 8), static
    shapes all the same: replay equals eager execution."""
    model = save_tiny_gemma3(tmp_path / "gemma3", sliding_window=6)
    options = dict(policy=policy, dtype="float32", cuda_graph_batch_sizes=(1, 2, 3, 4))
    eager = run(model, enforce_eager=True, **options)
    graphs = run(model, enforce_eager=False, **options)
    for a, b in zip(eager, graphs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].state_positions == b.outputs[0].state_positions
        assert [len(layer) for layer in a.outputs[0].state_positions] == [5, 8, 5, 8]


@pytest.mark.parametrize("policy", ["tova", "window"])
def test_padded_graph_batches_leave_live_rows_alone(tiny_llama, policy):
    """One bucket of 4: batches of 1 to 3 rows are padded with rows on the spare slot."""
    eager = run(tiny_llama, enforce_eager=True, policy=policy, dtype="float32")
    padded = run(
        tiny_llama,
        enforce_eager=False,
        policy=policy,
        dtype="float32",
        cuda_graph_batch_sizes=(4,),
    )
    for a, b in zip(eager, padded, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].state_positions == b.outputs[0].state_positions


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_decode_step_synchronises_once(tiny_llama, enforce_eager):
    """A decode step reads its sampled tokens (and log-probs and evicted ages with them) in
    one copy; nothing else in the step waits for the GPU."""
    engine = LLMEngine(
        EngineConfig(
            str(tiny_llama),
            state_size=8,
            device="cuda",
            max_num_seqs=4,
            enforce_eager=enforce_eager,
        )
    )
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=40, ignore_eos=True, logprobs=1)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    scheduler = engine.core.scheduler
    while any(r.prefilling for r in scheduler.running + list(scheduler.waiting)):
        engine.step()
    steps = 10
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                assert engine.step()  # every request still decoding
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= steps, [str(w.message) for w in syncs]
