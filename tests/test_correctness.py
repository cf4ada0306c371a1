"""The engine against independent references: transformers' forward and generate, and a
slow per-token TOVA decoder written from the paper."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.conftest import needs_default_model, save_tiny_gemma3, save_tiny_model
from tests.reference_gemma3 import Gemma3ReferenceDecoder
from tests.reference_tova import ReferenceDecoder
from tova_engine import LLM, SamplingParams

PROMPT = [5, 17, 33, 8, 61, 42, 7, 90, 12, 3, 77, 25, 50, 9, 14, 66, 31, 4, 88, 21, 47, 70]


def hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, from transformers' own forward."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(token_ids[1:]).unsqueeze(1)).squeeze(1)


def engine_prompt_logprobs(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    out = llm.generate([token_ids], params, use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    return torch.tensor(
        [pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], token_ids[1:], strict=True)],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_full_policy_matches_transformers_forward(tiny_llama, chunk):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    llm = LLM(
        str(tiny_llama),
        state_size=64,
        policy="full",
        dtype="float32",
        device="cpu",
        prefill_chunk_size=chunk,
        max_num_seqs=4,
    )
    ours = engine_prompt_logprobs(llm, PROMPT)
    torch.testing.assert_close(ours, hf_logprobs(hf, PROMPT), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("qwen2", {}),
        ("qwen3", {}),  # q/k norms, head_dim 128 (not hidden / heads), untied
        ("qwen3", {"tie_word_embeddings": True, "head_dim": 16}),
        ("mistral", {}),
        ("llama", {"tie_word_embeddings": True}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
    ],
)
def test_architectures_match_transformers(tmp_path, model_type, extra):
    folder = save_tiny_model(tmp_path / model_type, model_type, **extra)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(
        str(folder),
        state_size=64,
        policy="full",
        dtype="float32",
        device="cpu",
        prefill_chunk_size=7,
        max_num_seqs=2,
    )
    torch.testing.assert_close(
        engine_prompt_logprobs(llm, PROMPT), hf_logprobs(hf, PROMPT), atol=1e-4, rtol=0
    )


def test_decode_logprobs_match_transformers(tiny_llama, hf_tiny_llama):
    """Generated tokens go through the decode path: their log-probs must match too."""
    llm = LLM(str(tiny_llama), state_size=64, policy="full", dtype="float64", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    tokens = PROMPT + out.token_ids
    expected = hf_logprobs(hf_tiny_llama, tokens)[len(PROMPT) - 1 :]
    ours = torch.tensor(
        [p[t].logprob for p, t in zip(out.logprobs, out.token_ids, strict=True)],
        dtype=torch.float64,
    )
    # transformers normalises in float32 even for a float64 model: 1e-6, not 1e-12.
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert out.token_ids == hf_greedy(hf_tiny_llama, PROMPT, 12)


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, never stopping early."""
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def reference_decoder(hf_model, state_size: int, policy: str = "tova",
                      protect_recent: int = 0) -> ReferenceDecoder:
    c = hf_model.config
    return ReferenceDecoder(
        weights={k: v.double() for k, v in hf_model.state_dict().items()},
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        rope_theta=c.rope_parameters["rope_theta"],
        eps=c.rms_norm_eps,
        state_size=state_size,
        policy=policy,
        protect_recent=protect_recent,
    )


@pytest.mark.parametrize("policy", ["tova", "window", "sink"])
@pytest.mark.parametrize("whole_prefill", [False, True])
def test_retained_positions_match_slow_reference(tiny_llama, hf_tiny_llama, policy, whole_prefill):
    state_size, max_tokens = 8, 10
    generated, positions = reference_decoder(hf_tiny_llama, state_size, policy).generate(
        PROMPT, max_tokens, whole_prefill
    )
    llm = LLM(
        str(tiny_llama),
        state_size=state_size,
        policy=policy,
        dtype="float64",
        device="cpu",
        prefill_chunk_size=len(PROMPT) if whole_prefill else 1,
        # The paper's TOVA, as the reference has it (the default also protects the latest
        # half: tests/test_policies.py checks that against the reference).
        protect_recent=0 if policy == "tova" else None,
    )
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, return_state=True
    )
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == generated
    assert out.state_positions == positions
    # The state really evicted: not simply the last positions (TOVA keeps old tokens too).
    assert all(len(layer) == state_size for layer in positions)


@needs_default_model
def test_smollm2_greedy_matches_transformers_generate():
    pytest.importorskip("accelerate")
    from tova_engine.loader import default_model_path

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    llm = LLM(state_size=512, policy="full", dtype="float32", device="cpu")
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = llm.generate([list(prompt)], params, use_tqdm=False)[0].outputs[0].token_ids
    assert ours == hf_greedy(hf, list(prompt), 32)


@pytest.mark.parametrize("whole_prefill", [False, True])
def test_qwen3_retained_positions_match_slow_reference(tmp_path, whole_prefill):
    """Qwen3's per-head q/k norms in the slow reference decoder too: the same tokens and the
    same retained positions per layer (float64)."""
    folder = save_tiny_model(tmp_path / "qwen3", "qwen3", head_dim=16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    # The default TOVA: the latest half of the 8 entries protected.
    generated, positions = reference_decoder(hf, 8, "tova", protect_recent=4).generate(
        PROMPT, 10, whole_prefill)
    llm = LLM(str(folder), state_size=8, dtype="float64", device="cpu",
              prefill_chunk_size=len(PROMPT) if whole_prefill else 1)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, return_state=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == generated
    assert out.state_positions == positions


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_gemma3_matches_transformers_past_the_window(tiny_gemma3, chunk):
    """Gemma 3 with policy full: the 22-token prompt and 12 generated tokens run past the
    local layers' window of 8, so their state (7 entries: the window less the query itself)
    evicts while the global layers keep everything; prompt and decode log-probs and the
    greedy tokens equal transformers' own forward and generate."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32)
    hf = hf.eval()
    llm = LLM(str(tiny_gemma3), state_size=64, policy="full", dtype="float32", device="cpu",
              prefill_chunk_size=chunk, max_num_seqs=2)
    torch.testing.assert_close(
        engine_prompt_logprobs(llm, PROMPT), hf_logprobs(hf, PROMPT), atol=1e-4, rtol=0
    )
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True,
                            return_state=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(hf, PROMPT, 12)
    expected = hf_logprobs(hf, PROMPT + out.token_ids)[len(PROMPT) - 1 :]
    ours = torch.tensor([p[t].logprob for p, t in zip(out.logprobs, out.token_ids, strict=True)],
                        dtype=torch.float64)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    fed = len(PROMPT) + 12 - 1  # the last sampled token is never fed
    local, full = list(range(fed - 7, fed)), list(range(fed))
    assert out.state_positions == [local, full, local, full]


def gemma3_reference(hf_model, state_size: int) -> Gemma3ReferenceDecoder:
    c = hf_model.config
    rope = c.rope_parameters
    return Gemma3ReferenceDecoder(
        weights={k: v.double() for k, v in hf_model.state_dict().items()},
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rope_theta=rope["full_attention"]["rope_theta"], eps=c.rms_norm_eps,
        state_size=state_size, layer_types=tuple(c.layer_types), sliding_window=c.sliding_window,
        attention_scalar=c.query_pre_attn_scalar, hidden_size=c.hidden_size,
        rope_local_theta=rope["sliding_attention"]["rope_theta"],
        rope_linear_factor=rope["full_attention"].get("factor", 1.0),
    )


@pytest.mark.parametrize(("whole_prefill", "capacity"), [(False, None), (True, None), (False, 5)])
def test_gemma3_retained_positions_match_slow_reference(tiny_gemma3, whole_prefill, capacity):
    """TOVA on the global layers, windows on the local ones (float64): the slow reference's
    tokens and retained positions. Engine state 10: local layers (window 8) hold the last 7
    positions; a request's own state_size 5 gives every layer 5, the local ones the last 5."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float64)
    size = capacity or 10
    generated, positions = gemma3_reference(hf.eval(), size).generate(PROMPT, 10, whole_prefill)
    llm = LLM(str(tiny_gemma3), state_size=10, dtype="float64", device="cpu",
              prefill_chunk_size=len(PROMPT) if whole_prefill else 1,
              protect_recent=0)  # the paper's TOVA, as the reference has it
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, return_state=True,
                            state_size=capacity)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == generated
    assert out.state_positions == positions
    fed = len(PROMPT) + 10 - 1
    latest = list(range(fed - min(size, 7), fed))
    assert positions[0] == positions[2] == latest
    # The global layers evicted by attention: not simply the latest positions.
    assert len(positions[1]) == size and positions[1] != list(range(fed - size, fed))
