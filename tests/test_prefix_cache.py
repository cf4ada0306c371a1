"""The prefix cache (core/prefix_cache.py) is exact: a prompt that restores a cached prefix's
state gives the tokens, log-probs and retained positions of a cold prefill, for every policy,
per-token and chunked prefill, n > 1, a request's own state_size and protect_recent, and
Gemma 3's local layers. Hits are counted in the outputs; the pool stays within its rows."""

from __future__ import annotations

import random

import pytest

from tests.conftest import save_tiny_gemma3
from tova_engine import LLM, SamplingParams
from tova_engine.core.prefix_cache import MIN_BLOCK_TOKENS, PrefixCache

VOCAB = 96
rng = random.Random(7)
SHARED = [rng.randrange(3, VOCAB) for _ in range(150)]  # past two 64-token blocks
TAILS = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (9, 23, 1)]


def make_llm(model, cache: bool, **options) -> LLM:
    settings = dict(state_size=24, policy="tova", dtype="float64", device="cpu",
                    prefill_chunk_size=8, max_num_seqs=6)
    settings.update(options)
    # 1 MiB: dozens of rows of these tiny states (the default, 1/16 of 6 slots, is none).
    return LLM(str(model), prefix_cache_bytes=2**20 if cache else 0, **settings)


def summary(output) -> list:
    return [
        (c.token_ids, c.state_positions,
         [round(next(iter(p.values())).logprob, 12) for p in c.logprobs or []])
        for c in output.outputs
    ]


def run(llm: LLM, params: SamplingParams) -> tuple[list, list[int]]:
    """The shared prompt alone first (its blocks get cached), then prompts that extend it,
    one at a time: every request's outputs and how many prompt tokens it restored."""
    outputs, cached = [], []
    for prompt in [SHARED, *(SHARED + tail for tail in TAILS)]:
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        outputs.append(summary(out))
        cached.append(out.num_cached_tokens)
    return outputs, cached


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, return_state=True,
                        logprobs=1)


@pytest.mark.parametrize("policy", ["tova", "h2o", "sink", "window", "full"])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_restored_prefix_equals_cold_prefill(tiny_llama, policy, chunk):
    state_size = 200 if policy == "full" else 24
    options = dict(policy=policy, prefill_chunk_size=chunk, state_size=state_size)
    cold, none = run(make_llm(tiny_llama, cache=False, **options), GREEDY)
    warm, cached = run(make_llm(tiny_llama, cache=True, **options), GREEDY)
    assert warm == cold
    assert none == [0, 0, 0, 0]
    block = chunk * -(-MIN_BLOCK_TOKENS // chunk)
    # The shared prompt alone finds nothing; each extension restores the shared prompt's
    # last whole block (the first prompt cached it while it prefilled).
    assert cached == [0, *[len(SHARED) // block * block] * 3]


def test_n_choices_and_a_request_own_state_size_and_protection(tiny_llama):
    params = [
        SamplingParams(n=3, seed=11, temperature=0.9, max_tokens=6, return_state=True,
                       logprobs=1),
        SamplingParams(temperature=0, max_tokens=6, state_size=12, protect_recent=3,
                       return_state=True, logprobs=1),
    ]
    for p in params:
        cold, _ = run(make_llm(tiny_llama, cache=False), p)
        warm, cached = run(make_llm(tiny_llama, cache=True), p)
        assert warm == cold
        assert cached[1:] == [128, 128, 128]


def test_a_state_made_under_other_request_settings_is_not_restored(tiny_llama):
    llm = make_llm(tiny_llama, cache=True)
    llm.generate([SHARED], GREEDY, use_tqdm=False)
    for other in (dict(state_size=12), dict(protect_recent=2)):
        params = SamplingParams(temperature=0, max_tokens=2, **other)
        (out,) = llm.generate([SHARED + TAILS[0]], params, use_tqdm=False)
        assert out.num_cached_tokens == 0


def test_gemma3_local_layers(tmp_path):
    model = save_tiny_gemma3(tmp_path / "gemma", sliding_window=16)
    cold, _ = run(make_llm(model, cache=False, state_size=40), GREEDY)
    warm, cached = run(make_llm(model, cache=True, state_size=40), GREEDY)
    assert warm == cold and cached[1:] == [128, 128, 128]


def test_prompts_admitted_together_share_and_match_one_at_a_time(tiny_llama):
    """Whole chunks on the grid: a prompt's outputs do not depend on what ran beside it. The
    prompts are admitted in one step; those whose first chunk runs after the first prompt's
    blocks were saved restore them (looked up at the first chunk, not at admission)."""
    prompts = [SHARED + tail for tail in TAILS] * 2
    alone = [summary(out) for p in prompts
             for out in make_llm(tiny_llama, cache=False).generate([p], GREEDY, use_tqdm=False)]
    llm = make_llm(tiny_llama, cache=True, max_num_batched_tokens=20)
    together = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [summary(out) for out in together] == alone
    cached = [out.num_cached_tokens for out in together]
    assert cached[0] == 0 and cached[-1] == 128 and set(cached) <= {0, 64, 128}


def test_prompt_logprobs_run_the_whole_prompt(tiny_llama):
    llm = make_llm(tiny_llama, cache=True)
    llm.generate([SHARED], GREEDY, use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    (out,) = llm.generate([SHARED + TAILS[0]], params, use_tqdm=False)
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(SHARED) + len(TAILS[0])


def test_the_pool_reuses_its_least_recently_used_row():
    from tova_engine.sampling_params import SamplingParams as Params
    from tova_engine.step.request import CoreRequest, Request

    def request(name: str, tokens: list[int]) -> Request:
        core = CoreRequest(name, tokens, Params(), capacity=8, max_tokens=1)
        return Request.of(core, [None])

    cache = PrefixCache(range(10, 12), prefill_chunk_size=64)
    a, b, c = (request(n, [i] * 64 + [0]) for i, n in enumerate("abc", start=3))
    assert [cache.save_row(r, 64) for r in (a, b)] == [10, 11]
    # Saved in the step being scheduled: its restores would run before the save.
    assert cache.lookup(request("a1", a.prompt_token_ids)) is None
    cache.new_step()
    assert cache.lookup(request("a2", a.prompt_token_ids)) == (64, 10)  # a is now the latest
    assert cache.save_row(c, 64) == 11  # b's row goes
    cache.new_step()
    assert cache.lookup(request("b2", b.prompt_token_ids)) is None
    assert cache.rows_used == 2
    assert cache.save_row(a, 64) is None  # cached already
    assert cache.save_row(a, 32) is None  # not a block boundary
    cache.forget([10])
    assert cache.lookup(request("a3", a.prompt_token_ids)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [{}, {"enforce_eager": True}])
@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_cuda_restored_prefix_equals_cold_prefill(tiny_llama, policy, mode):
    """On CUDA, float32: graph replay (decode and prefill graphs) and the fused kernels run
    eagerly, with a restored prefix, give the cold prefill's outputs."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    options = dict(policy=policy, dtype="float32", device="cuda", **mode)
    cold, _ = run(make_llm(tiny_llama, cache=False, **options), GREEDY)
    warm, cached = run(make_llm(tiny_llama, cache=True, **options), GREEDY)
    assert cached[1:] == [128, 128, 128]
    assert [[c[:2] for c in out] for out in warm] == [[c[:2] for c in out] for out in cold]
