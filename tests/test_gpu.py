"""CUDA checks (skipped without a GPU): the same engine on the GPU (CUDA graphs, the fused
kernels eagerly, or the PyTorch path) agrees with the CPU path, and the state's memory stays
constant however long the generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_correctness import PROMPT
from tova_engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu
SMOLLM2_SHAPES = Path(__file__).parents[1] / "benchmarks" / "configs" / "smollm2-135m.json"


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)


# CUDA modes: graphs over the fused Triton kernels (the default), the same kernels eagerly,
# and the PyTorch path.
CUDA_MODES = {"graphs": {}, "eager": {"enforce_eager": True}, "torch": {"kernels": "torch"}}


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("mode", list(CUDA_MODES))
def test_cuda_float32_matches_cpu(tiny_llama, policy, chunk, mode):
    assert_cuda_matches_cpu(tiny_llama, policy, chunk, mode)


@pytest.mark.parametrize("mode", list(CUDA_MODES))
def test_qwen3_cuda_float32_matches_cpu(tmp_path, mode):
    """Qwen3's per-head q/k norms (inside the fused RoPE kernel) on the GPU paths."""
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "qwen3", "qwen3", head_dim=16)
    assert_cuda_matches_cpu(model, "tova", 7, mode)


@pytest.mark.parametrize("mode", list(CUDA_MODES))
def test_gemma3_cuda_float32_matches_cpu(tmp_path, mode):
    """Gemma 3 on the GPU paths: (1 + weight) norms, q/k norms in the RoPE kernel, gelu(tanh)
    gating, local layers (window 6) in their own buffers beside global ones running TOVA."""
    from tests.conftest import save_tiny_gemma3

    model = save_tiny_gemma3(tmp_path / "gemma3", sliding_window=6)
    assert_cuda_matches_cpu(model, "tova", 7, mode)


def assert_cuda_matches_cpu(model, policy: str, chunk: int, mode: str) -> None:
    params = greedy(16, return_state=True)
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(
            str(model),
            state_size=8,
            policy=policy,
            dtype="float32",
            device=device,
            prefill_chunk_size=chunk,
            **(CUDA_MODES[mode] if device == "cuda" else {}),
        )
        outs[device] = llm.generate([PROMPT, PROMPT[::-1]], params, use_tqdm=False)
    for cpu, gpu in zip(outs["cpu"], outs["cuda"], strict=True):
        assert gpu.outputs[0].token_ids == cpu.outputs[0].token_ids
        assert gpu.outputs[0].state_positions == cpu.outputs[0].state_positions


def test_cuda_bfloat16_sampling_is_reproducible(tiny_llama):
    llm = LLM(str(tiny_llama), state_size=8, dtype="bfloat16", device="cuda", max_num_seqs=8)
    params = SamplingParams(
        n=3, max_tokens=20, seed=11, top_p=0.9, top_k=20, logprobs=3, ignore_eos=True
    )
    first = llm.generate([PROMPT, PROMPT[:5]], params, use_tqdm=False)
    again = llm.generate([PROMPT, PROMPT[:5]], params, use_tqdm=False)
    for a, b in zip(first, again, strict=True):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert all(len(o.token_ids) == 20 for o in a.outputs)


def test_cuda_memory_constant_over_long_generation():
    llm = LLM(
        str(SMOLLM2_SHAPES), load_format="dummy", state_size=64, device="cuda", max_num_seqs=4
    )
    # Warm-up: allocator pools, and the prefill shape's graph (captured on second sight).
    for _ in range(2):
        llm.generate([[1, 2, 3]] * 4, greedy(64), use_tqdm=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = llm.generate([[1, 2, 3]] * 4, greedy(8 * 64, return_state=True), use_tqdm=False)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert all(len(layer) == 64 for o in out for layer in o.outputs[0].state_positions)


@pytest.mark.parametrize("policy", ["tova", "h2o", "window"])
def test_prefill_graphs_replay_equals_eager_prefill(tiny_llama, policy):
    """Chunk shapes that recur are captured and replayed: same tokens, same retained
    positions as prefilling eagerly (and as the CPU path)."""
    import random

    rng = random.Random(5)
    rounds = [[[rng.randrange(3, 96) for _ in range(22)] for _ in range(3)] for _ in range(3)]
    params = greedy(8, return_state=True)
    outs = {}
    for name, extra in (("graphs", {}), ("eager", {"max_prefill_graphs": 0}),
                        ("cpu", {"device": "cpu"})):
        llm = LLM(str(tiny_llama), state_size=8, policy=policy, dtype="float32",
                  device=extra.pop("device", "cuda"), prefill_chunk_size=5, max_num_seqs=8,
                  **extra)
        outs[name] = [llm.generate(batch, params, use_tqdm=False) for batch in rounds]
        if name == "graphs":
            graphs = llm.engine.core.executor.worker.runner.prefill_graphs
            assert graphs.captures > 0 and graphs.replays > graphs.captures
    for name in ("eager", "cpu"):
        for want_round, got_round in zip(outs[name], outs["graphs"], strict=True):
            for want, got in zip(want_round, got_round, strict=True):
                assert got.outputs[0].token_ids == want.outputs[0].token_ids
                assert got.outputs[0].state_positions == want.outputs[0].state_positions


def test_sampler_flags_broken_rows_on_cuda():
    """A row with a NaN, a +inf or nothing samplable is reported, on the device's kernels."""
    from tova_engine.execution.sampler import Sampler, SampleRow

    logits = torch.zeros(4, 50, device="cuda")
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    rows = [SampleRow(SamplingParams(temperature=0), [1], [], None)] * 4
    out = Sampler(device="cuda")(logits, rows)
    assert out.finite.tolist() == [False, False, False, True]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_an_engine_on_the_second_gpu_equals_one_on_the_first(tiny_llama):
    """LLM(device="cuda:1") in a process whose current device is 0: its state lives on
    cuda:1 and its graphs over the fused kernels give the first GPU's tokens and positions."""
    params = greedy(16, return_state=True)
    outs = {}
    for device in ("cuda:0", "cuda:1"):
        llm = LLM(str(tiny_llama), state_size=8, dtype="float32", device=device)
        try:
            outs[device] = llm.generate([PROMPT, PROMPT[::-1]], params, use_tqdm=False)
            state = llm.engine.core.executor.worker.state
            assert state.positions.device == state.k[0].device == torch.device(device)
        finally:
            llm.close()
    for first, second in zip(outs["cuda:0"], outs["cuda:1"], strict=True):
        assert second.outputs[0].token_ids == first.outputs[0].token_ids
        assert second.outputs[0].state_positions == first.outputs[0].state_positions


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_tensor_parallel_families_over_two_gpus_equal_one(tmp_path, family):
    """Qwen3 and Gemma 3 over NCCL with CUDA graphs over the fused kernels (replicated q/k
    norms; Gemma's local layers beside global ones): one GPU's tokens and positions."""
    import random

    from tests.conftest import save_tiny_gemma3, save_tiny_model

    shapes = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=128, head_dim=16)
    if family == "gemma3":
        model = save_tiny_gemma3(tmp_path / family, sliding_window=6, **shapes)
    else:
        model = save_tiny_model(tmp_path / family, family, **shapes)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 96) for _ in range(n)] for n in (13, 30, 7)]
    params = greedy(24, return_state=True)
    outs = {}
    for size in (1, 2):
        llm = LLM(str(model), state_size=8, dtype="float32", device="cuda",
                  prefill_chunk_size=5, tensor_parallel_size=size)
        try:
            outs[size] = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.close()
    for a, b in zip(outs[1], outs[2], strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].state_positions == a.outputs[0].state_positions


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
@pytest.mark.parametrize("mode", list(CUDA_MODES))
def test_tensor_parallel_over_two_gpus_equals_one(tmp_path, policy, mode):
    """NCCL, one process per GPU, float32: the same tokens and retained positions as one GPU,
    with CUDA graphs over the fused kernels (the attention sums all-reduced inside the graph),
    the kernels eagerly, and the PyTorch path; both ranks hold the same entries."""
    import random

    from tests.conftest import save_tiny_model

    # head_dim 16: the smallest the kernels' tl.dot takes
    model = save_tiny_model(tmp_path / "tp", num_attention_heads=8, num_key_value_heads=4,
                            hidden_size=128)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 96) for _ in range(n)] for n in (13, 30, 7)]
    params = greedy(24, return_state=True)
    outs, ranks = {}, {}
    for size in (1, 2):
        llm = LLM(str(model), state_size=8, policy=policy, dtype="float32", device="cuda",
                  prefill_chunk_size=5, tensor_parallel_size=size, **CUDA_MODES[mode])
        try:
            outs[size] = llm.generate(prompts, params, use_tqdm=False)
            ranks[size] = llm.engine.core.retained_by_rank()
        finally:
            llm.close()
    for a, b in zip(outs[1], outs[2], strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].state_positions == a.outputs[0].state_positions
    (positions, entries), (other_positions, other_entries) = ranks[2]
    live = slice(0, llm.engine.config.max_num_seqs)  # not the graphs' padding slot
    assert entries[live].equal(other_entries[live])
    assert positions[:, live].equal(other_positions[:, live])


def _fp8_gpu() -> bool:
    from tova_engine.model.fp8 import fp8_matmul_problem

    return torch.cuda.is_available() and fp8_matmul_problem(torch.device("cuda")) is None


needs_fp8 = pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU with FP8 matmuls (sm89+)")


@needs_fp8
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_scaled_mm_equals_the_emulation(tokens):
    """torch._scaled_mm on the e4m3 operands against the same product in float32 ops."""
    from tova_engine.model.fp8 import Fp8Linear

    torch.manual_seed(tokens)
    with torch.device("cuda"):
        layer = Fp8Linear(256, 384, torch.nn.Parameter(torch.randn(384, dtype=torch.bfloat16)))
        layer.load_rows(0, torch.randn(384, 256))
        x = torch.randn(tokens, 256, dtype=torch.bfloat16) * 4
    got, want = layer(x).float(), layer.emulated(x).float()
    # Both sum the same e4m3 products in float32; bfloat16 output rounding apart.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@needs_fp8
@pytest.mark.parametrize("mode", ["graphs", "eager"])
def test_fp8_weights_on_the_gpu_follow_the_cpu_emulation(tiny_llama, mode):
    """The engine with FP8 weights (CUDA graphs or eager) against the CPU's emulated FP8, in
    bfloat16 on both: the first greedy token and its log-probability."""
    params = greedy(8, logprobs=1)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 3]]
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(tiny_llama), device=device, dtype="bfloat16", state_size=16,
                  max_num_seqs=4, quantization="fp8",
                  **(CUDA_MODES[mode] if device == "cuda" else {}))
        outs[device] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.core.info.quantization == "fp8"
    for a, b in zip(outs["cpu"], outs["cuda"], strict=True):
        first = a.outputs[0].token_ids[0]
        assert b.outputs[0].token_ids[0] == first
        assert abs(b.outputs[0].logprobs[0][first].logprob
                   - a.outputs[0].logprobs[0][first].logprob) < 0.2
        assert len(b.outputs[0].token_ids) == 8


def test_float8_state_on_the_gpu_equals_the_cpu_path(tiny_llama):
    """kv_cache_dtype="fp8" on CUDA (the PyTorch kernels) against the CPU's float8 state, in
    float32: greedy tokens and retained positions with evictions."""
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(tiny_llama), device=device, dtype="float32", state_size=8,
                  max_num_seqs=4, prefill_chunk_size=4, kv_cache_dtype="fp8", kernels="torch")
        outs[device] = llm.generate([PROMPT], greedy(12, return_state=True), use_tqdm=False)
    a, b = outs["cpu"][0].outputs[0], outs["cuda"][0].outputs[0]
    assert b.token_ids == a.token_ids and b.state_positions == a.state_positions
