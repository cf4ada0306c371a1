"""The fused Triton kernels on CPU, under Triton's interpreter (TRITON_INTERPRET=1): the same
greedy tokens and retained positions as the PyTorch path (float32), on one rank and with the
heads split over two (gloo), where the ranks all-reduce each entry's attention before they
evict and must hold the same entries afterwards. On a GPU the same checks run compiled, with
CUDA graphs (tests/test_gpu.py)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from tests.conftest import save_tiny_gemma3, save_tiny_model
from tests.elementwise_checks import check_elementwise_kernels
from tova_engine import LLM, SamplingParams
from tova_engine.state.policies import Policy, make_policy

# Not imported here: Triton reads TRITON_INTERPRET when it is first imported.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton (dev extras, Linux x86-64)")

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, return_state=True)


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("kernel-model"), num_attention_heads=8,
                           num_key_value_heads=4)


@pytest.fixture(scope="module")
def interpreted_call():
    """Runs a function in a process started with the variable set: Triton reads it when it is
    imported, and torch imports it (the tensor-parallel ranks inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            yield lambda function, *args: pool.submit(function, *args).result(timeout=600)


@pytest.fixture(scope="module")
def interpreted(interpreted_call):
    """`run` in the interpreted process."""
    return lambda *args: interpreted_call(run, *args)


def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 96) for _ in range(length)] for length in (11, 6, 15)]


def run(model, policy: str, kernels: str, tp: int = 1):
    """(each prompt's (tokens, retained positions), each rank's (positions, entries))."""
    llm = LLM(str(model), dtype="float32", device="cpu", max_num_seqs=4, policy=policy,
              state_size=5, prefill_chunk_size=1, kernels=kernels, tensor_parallel_size=tp)
    try:
        assert llm.engine.core.executor.worker.runner.fused_attention == (kernels == "triton")
        outputs = llm.generate(prompts(), PARAMS, use_tqdm=False)
        results = [(o.outputs[0].token_ids, o.outputs[0].state_positions) for o in outputs]
        return results, llm.engine.core.retained_by_rank()
    finally:
        llm.close()


def assert_same(reference, outputs) -> None:
    assert len(outputs) == len(reference)
    for (tokens, positions), (ref_tokens, ref_positions) in zip(outputs, reference, strict=True):
        assert len(tokens) == PARAMS.max_tokens
        assert tokens == ref_tokens
        assert positions == ref_positions


def assert_ranks_agree(retained) -> None:
    first_positions, first_entries = retained[0]
    for positions, entries in retained[1:]:
        assert entries.equal(first_entries)
        assert positions.equal(first_positions)


# The built-ins, TOVA keeping the latest 2 of 5, and a policy declared here.
KERNEL_POLICIES = {
    "tova": "tova", "h2o": "h2o", "sink": "sink", "window": "window",
    "tova-recent": make_policy("tova", 2),
    "declared": Policy("declared", score="accumulated", protect_first=1, protect_recent=0.4),
}


@pytest.mark.parametrize("name", list(KERNEL_POLICIES))
def test_fused_kernels_equal_the_pytorch_path(interpreted, four_kv_heads, name):
    policy = KERNEL_POLICIES[name]
    reference, _ = run(four_kv_heads, policy, "torch")
    fused, _ = interpreted(four_kv_heads, policy, "triton")
    assert_same(reference, fused)


@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_fused_kernels_over_two_ranks_evict_alike(interpreted, four_kv_heads, policy):
    """Each rank scores with its 4 of the 8 heads' attention; the all-reduced sums make the
    choice the one rank's."""
    reference, _ = run(four_kv_heads, policy, "torch")
    fused, retained = interpreted(four_kv_heads, policy, "triton", 2)
    assert_same(reference, fused)
    assert len(retained) == 2
    assert_ranks_agree(retained)


def float8_decode_step(policy_name: str) -> dict[str, float | bool]:
    """One decode layer on a float8 state, the same inputs through the PyTorch backend and
    the fused kernels: rows full (evicting) and not, grouped-query heads. Returns how far
    the outputs are apart and whether the stored state is the same bit for bit."""
    from tova_engine.attention.fused import FusedDecodeAttention
    from tova_engine.attention.pytorch import DecodeAttention
    from tova_engine.model.config import ModelConfig
    from tova_engine.state.kv_state import KVState

    config = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64,
                         intermediate_size=96, num_layers=1, num_heads=8, num_kv_heads=2,
                         head_dim=16, max_position_embeddings=64)
    policy = make_policy(policy_name)
    generator = torch.Generator().manual_seed(11)

    def state() -> KVState:
        torch.manual_seed(3)
        kv = KVState(config, 4, 6, torch.float32, torch.device("cpu"),
                     track_stats=policy.uses_stats, kv_cache_dtype="fp8")
        kv.k[0][:, :, :6] = torch.randn(4, 2, 6, 16) * 2
        kv.v[0][:, :, :6] = torch.randn(4, 2, 6, 16)
        kv.positions[0, :, :6] = torch.arange(6)
        kv.num_entries[:] = torch.tensor([6, 3, 6, 0])
        kv.num_seen[:] = torch.tensor([9, 3, 6, 0])
        if kv.stats is not None:
            kv.stats[0, :, :6] = torch.rand(4, 6)
        return kv

    q = torch.randn(4, 8, 16, generator=generator)
    k = torch.randn(4, 2, 16, generator=generator) * 3
    v = torch.randn(4, 2, 16, generator=generator)
    slots = torch.tensor([2, 0, 1, 3])
    states, outputs = {}, {}
    for name in ("torch", "fused"):
        kv = states[name] = state()
        backend = (DecodeAttention(kv, policy, slots.tolist()) if name == "torch"
                   else FusedDecodeAttention(kv, policy, slots))
        outputs[name] = backend(0, q, k, v)
        backend.finish()
    a, b = states["torch"], states["fused"]
    held = slice(0, 6)  # the entries (the spare one after them is scratch, never read)
    return {
        "output_diff": (outputs["torch"] - outputs["fused"]).abs().max().item(),
        "data_equal": all(torch.equal(x.data[:, :, held].view(torch.uint8),
                                      y.data[:, :, held].view(torch.uint8))
                          for x, y in ((a.k[0], b.k[0]), (a.v[0], b.v[0]))),
        "scale_equal": torch.equal(a.k[0].scale[:, :, held], b.k[0].scale[:, :, held])
        and torch.equal(a.v[0].scale[:, :, held], b.v[0].scale[:, :, held]),
        "positions_equal": torch.equal(a.positions[..., held], b.positions[..., held])
        and torch.equal(a.num_entries, b.num_entries),
    }


@pytest.mark.parametrize("policy", ["tova", "h2o", "window"])
def test_the_kernels_read_and_write_a_float8_state_as_the_pytorch_path(interpreted_call,
                                                                        policy):
    """kv_cache_dtype="fp8": e4m3 entries with their scales folded into the logits and the
    probabilities give the PyTorch path's output, and the new token is stored quantized bit
    for bit as it is there, at the entry the same policy chose. (Through whole models the
    two paths' RMSNorm and RoPE differ in the last bit, and a float8 rounding boundary can
    turn that into a step of e4m3: equal tokens are not to be expected there. Nor is the
    quantization done in Triton: its interpreter rounds -127.1 to -64 in e4m3, so the new token
    is quantized by the PyTorch function for both.)"""
    result = interpreted_call(float8_decode_step, policy)
    assert result["output_diff"] < 1e-5
    assert result["data_equal"] and result["scale_equal"] and result["positions_equal"]


def test_elementwise_kernels_equal_the_pytorch_modules(interpreted_call):
    """RMSNorm (Llama's, Gemma's; with the residual add), RoPE after each style of q/k norm,
    silu and gelu(tanh) gating, float32: the kernels the fused path runs for every family."""
    assert interpreted_call(check_elementwise_kernels, "cpu", torch.float32) == 24


def test_qwen3_through_the_fused_kernels(interpreted, tmp_path):
    """Qwen3's per-head q/k norms on the fused path (in the RoPE kernel's launch) give the
    PyTorch path's tokens and retained positions."""
    model = save_tiny_model(tmp_path / "qwen3", "qwen3", num_attention_heads=8,
                            num_key_value_heads=4, head_dim=16)
    reference, _ = run(model, "tova", "torch")
    fused, _ = interpreted(model, "tova", "triton")
    assert_same(reference, fused)


def test_gemma3_through_the_fused_kernels(interpreted, tmp_path):
    """Gemma 3 on the fused path: global layers run the policy over 5 entries, local layers
    (window 4) keep their latest 3 by position in smaller buffers, with Gemma's attention
    scalar; the PyTorch path's tokens and retained positions."""
    model = save_tiny_gemma3(tmp_path / "gemma3", num_attention_heads=8, num_key_value_heads=4,
                             sliding_window=4)
    reference, _ = run(model, "tova", "torch")
    fused, _ = interpreted(model, "tova", "triton")
    assert_same(reference, fused)
    for _, positions in reference:
        assert [len(layer) for layer in positions] == [3, 5, 3, 5]
