"""Loader tests: every source yields Hugging Face Llama names and the reference's values."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tova_engine.loader import ModelSource, default_model_path, load_source
from tova_engine.loader import source as source_module
from tova_engine.loader.source import gguf_name
from tova_engine.model.gemma3 import Gemma3Model
from tova_engine.model.registry import model_class

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# ---------------------------------------------------------------- helpers


def tiny_model(kind: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if kind == "llama_tied":
        return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
    if kind == "llama_untied_llama3_rope":
        cfg = LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
        return LlamaForCausalLM(cfg)
    if kind == "qwen2_bias":
        return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False))
    if kind == "qwen3_qk_norm":
        head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=head_dim,
                                             tie_word_embeddings=False))
        with torch.no_grad():  # norms that are not all ones, so their loading is visible
            for name, param in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.uniform_(0.5, 1.5)
        return model
    if kind == "gemma3_windows":
        # A local and a global layer; what a GGUF cannot say is llama.cpp's default here (the
        # local RoPE base 10000, the attention scalar head_dim).
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **TINY, head_dim=8, sliding_window=4, pad_token_id=0, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=10000.0))
        with torch.no_grad():  # (1 + weight) norms: zeros would hide their loading
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(-0.5, 0.5)
        return model
    raise AssertionError(kind)


def expected_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's parameters under the loader's contract: no lm_head when tied."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        assert torch.equal(sd.pop("lm_head.weight"), sd["model.embed_tokens.weight"])
    return sd


def assert_same_weights(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0
) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name
        assert got[name].dtype == tensor.dtype, name
        # equal first: one pass over memory, where allclose makes several (2-core CI boxes).
        same = torch.equal(got[name], tensor)
        assert same or torch.allclose(got[name], tensor, rtol=0.0, atol=atol), name


# llama.cpp's names, written by the test itself (not the loader's map).
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma 3's four norms (ffn_norm is the one before the MLP there).
GEMMA3_TO_GGUF = {
    **HF_TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def to_gguf_name(hf_name: str, names: dict[str, str] = HF_TO_GGUF) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        return f"blk.{layer}.{names[part]}.{suffix}"
    return f"{names[stem]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in effect."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's loop for Llama 3 rope factors, written as llama.cpp writes it."""
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    orig = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = orig / rope["low_freq_factor"], orig / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (orig / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path: Path, model: PreTrainedModel) -> None:
    """An F32 GGUF file laid out the way llama.cpp's converter writes this model."""
    cfg = model.config
    gemma = cfg.model_type == "gemma3_text"
    arch = "gemma3" if gemma else cfg.model_type
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters["full_attention"] if gemma else cfg.rope_parameters
    writer = gguf.GGUFWriter(path, arch)
    if gemma:  # its window, and its layers' pattern: every second one global
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_uint32("gemma3.attention.sliding_window_pattern", 2)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, head_dim))
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for name, tensor in expected_weights(model).items():
        gguf_name_ = to_gguf_name(name, GEMMA3_TO_GGUF if gemma else HF_TO_GGUF)
        array = tensor.numpy()
        if gemma and name.endswith("norm.weight"):  # llama.cpp stores Gemma's 1 + weight
            array = array + np.float32(1.0)
        kind = gguf_name_.split(".")[-2]
        if arch == "llama" and kind in heads:  # llama.cpp's rope layout; qwen2 is left as is
            array = llama_cpp_permute(array, heads[kind])
        writer.add_tensor(gguf_name_, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- the embedded default model


@pytest.fixture(scope="module")
def default_source() -> ModelSource:
    return load_source(None)


@pytest.fixture(scope="module")
def reference_gguf_model() -> PreTrainedModel:
    """transformers' own GGUF loader: an independent dequantize + un-permute (~20 s)."""
    pytest.importorskip("accelerate")
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def test_default_model_config_and_tokenizer(default_source: ModelSource) -> None:
    cfg = default_source.config
    assert default_source.name == "SmolLM2-135M-Instruct"
    assert (cfg.model_type, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 9, 3)
    assert (cfg.head_dim, cfg.hidden_size, cfg.intermediate_size) == (64, 576, 1536)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (49152, 8192)
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    tok = default_source.tokenizer
    assert tok is not None and tok.chat_template
    assert tok.eos_token_id == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt


def test_default_gguf_weights_match_transformers(
    default_source: ModelSource, reference_gguf_model: PreTrainedModel
) -> None:
    got = dict(default_source.weights)
    assert_same_weights(got, expected_weights(reference_gguf_model), atol=1e-6)


def test_default_weights_are_lazy_and_reiterable(default_source: ModelSource) -> None:
    weights = default_source.weights
    assert not isinstance(weights, (list, tuple, dict))
    first = next(iter(weights))
    again = next(iter(weights))
    assert first[0] == again[0] == "model.embed_tokens.weight"
    assert torch.equal(first[1], again[1])


# ---------------------------------------------------------------- HF folders


@pytest.mark.parametrize(
    "kind", ["llama_tied", "llama_untied_llama3_rope", "qwen2_bias", "gemma3_windows"])
def test_hf_folder_round_trip(kind: str, tmp_path: Path) -> None:
    model = tiny_model(kind)
    model.save_pretrained(tmp_path)
    source = load_source(str(tmp_path))
    cfg = source.config
    assert source.name == tmp_path.name and source.tokenizer is None
    assert (cfg.model_type, cfg.num_layers, cfg.num_kv_heads) == (model.config.model_type, 2, 2)
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert cfg.attention_bias == (kind == "qwen2_bias")
    assert_same_weights(dict(source.weights), expected_weights(model))


def test_hf_folder_sharded_and_dtype(tmp_path: Path) -> None:
    model = tiny_model("qwen2_bias")
    model.save_pretrained(tmp_path, max_shard_size="10KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    source = load_source(tmp_path, load_format="safetensors", dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in expected_weights(model).items()}
    assert_same_weights(dict(source.weights), want)


def test_hf_folder_tokenizer(default_source: ModelSource, tmp_path: Path) -> None:
    tiny_model("llama_tied").save_pretrained(tmp_path)
    default_source.tokenizer.save_pretrained(tmp_path)
    tok = load_source(str(tmp_path)).tokenizer
    assert tok is not None and tok.chat_template and tok.eos_token_id == 2
    assert tok.encode("Hello world") == default_source.tokenizer.encode("Hello world")


# ---------------------------------------------------------------- GGUF files written here


@pytest.mark.parametrize(
    "kind",
    ["llama_tied", "llama_untied_llama3_rope", "qwen2_bias", "qwen3_qk_norm", "gemma3_windows"])
def test_gguf_round_trip(kind: str, tmp_path: Path) -> None:
    """F32 GGUF written like llama.cpp (q/k permuted for llama): weights and config come back."""
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "hf")
    write_gguf(tmp_path / "tiny-Q8_0.gguf", model)
    source = load_source(str(tmp_path / "tiny-Q8_0.gguf"))
    assert source.name == "tiny" and source.tokenizer is None  # file carries no vocabulary
    assert source.config == load_source(tmp_path / "hf", load_format="dummy").config
    # Gemma's norms come back as (1 + w) - 1 in float32: within rounding of w.
    atol = 1e-7 if kind.startswith("gemma3") else 0.0
    assert_same_weights(dict(source.weights), expected_weights(model), atol=atol)


def test_gguf_folder_with_one_file_and_dtype(tmp_path: Path) -> None:
    model = tiny_model("llama_tied")
    write_gguf(tmp_path / "m.gguf", model)
    source = load_source(tmp_path, load_format="gguf", dtype=torch.float16)
    want = {k: v.to(torch.float16) for k, v in expected_weights(model).items()}
    assert_same_weights(dict(source.weights), want)


@pytest.mark.parametrize(
    ("stem", "name"),
    [
        ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct"),
        ("qwen2.5-0.5b-instruct-q4_k_m", "qwen2.5-0.5b-instruct"),
        ("Llama-3.2-1B-Instruct-f16", "Llama-3.2-1B-Instruct"),
        ("model", "model"),
    ],
)
def test_gguf_display_name(stem: str, name: str) -> None:
    assert gguf_name(Path(f"/x/{stem}.gguf")) == name


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_multimodal_gemma3_folder_reads_its_text_model(prefix: str, tmp_path: Path) -> None:
    """The Gemma3ForConditionalGeneration checkpoint: config under text_config, weights
    under the text model's prefix (transformers >= 4.52, or 4.49-4.51); the vision tower's
    tensors are not read."""
    model = tiny_model("gemma3_windows")
    model.save_pretrained(tmp_path / "text")
    wrapper = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
               "text_config": model.config.to_dict(), "tie_word_embeddings": True}
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps(wrapper))
    tensors = {prefix + name.removeprefix("model."): t.contiguous()
               for name, t in expected_weights(model).items()}
    tensors["model.vision_tower.patch_embedding.weight"] = torch.zeros(4, 3)
    save_file(tensors, str(tmp_path / "mm" / "model.safetensors"))
    source = load_source(tmp_path / "mm")
    assert source.config == load_source(tmp_path / "text").config
    loaded = Gemma3Model.empty(source.config, torch.device("cpu"), torch.float32)
    loaded.load_hf_weights(source.weights)
    reference = Gemma3Model.empty(source.config, torch.device("cpu"), torch.float32)
    reference.load_hf_weights(load_source(tmp_path / "text").weights)
    assert_same_weights(loaded.state_dict(), reference.state_dict())


# ---------------------------------------------------------------- dummy


def test_dummy_default(default_source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real GGUF tokenizer is covered above; skipping its ~5 s rebuild keeps the suite short.
    sentinel = object()
    monkeypatch.setattr(source_module, "gguf_tokenizer", lambda reader, path: sentinel)
    source = load_source(None, load_format="dummy")
    assert source.weights is None and source.tokenizer is sentinel
    assert source.config == default_source.config
    assert source.name == default_source.name


def test_dummy_folder_and_bare_config(tmp_path: Path) -> None:
    model = tiny_model("qwen2_bias")
    model.config.save_pretrained(tmp_path)  # config.json only, no weights
    from_folder = load_source(tmp_path, load_format="dummy")
    assert from_folder.weights is None and from_folder.tokenizer is None
    bare = tmp_path / "tiny-qwen.json"
    bare.write_text(json.dumps(model.config.to_dict()))
    from_json = load_source(str(bare), load_format="dummy")
    assert from_json.weights is None and from_json.tokenizer is None
    assert from_json.name == "tiny-qwen"
    assert from_json.config == from_folder.config
    assert from_json.config.attention_bias and from_json.config.num_kv_heads == 2


@pytest.mark.parametrize(("kind", "dropped"), [
    ("llama_tied", "model.layers.1.post_attention_layernorm.weight"),
    ("llama_untied_llama3_rope", "lm_head.weight"),
    ("qwen2_bias", "model.layers.0.self_attn.v_proj.bias"),
    ("qwen3_qk_norm", "model.layers.1.self_attn.k_norm.weight"),
    ("gemma3_windows", "model.layers.0.post_feedforward_layernorm.weight"),
])
def test_a_checkpoint_lacking_a_tensor_is_refused(kind: str, dropped: str,
                                                  tmp_path: Path) -> None:
    """Each family expects every tensor its layers have, and nothing else: the whole
    checkpoint loads, one tensor fewer is named."""
    model = tiny_model(kind)
    model.save_pretrained(tmp_path)
    source = load_source(tmp_path)
    ours = model_class(source.config).empty(source.config, torch.device("cpu"), torch.float32)
    ours.load_hf_weights(source.weights)
    fewer = [(name, tensor) for name, tensor in source.weights if name != dropped]
    with pytest.raises(ValueError, match=rf"missing 1 tensors, e.g. \['{re.escape(dropped)}'\]"):
        ours.load_hf_weights(fewer)


def test_dummy_gemma3_norms_are_identities(tmp_path: Path) -> None:
    """Gemma's norms scale by (1 + weight): random weights get zeros there, not ones."""
    tiny_model("gemma3_windows").config.save_pretrained(tmp_path)
    config = load_source(tmp_path, load_format="dummy").config
    model = Gemma3Model.empty(config, torch.device("cpu"), torch.float32)
    model.init_random_weights(seed=0)
    norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    assert len(norms) == 2 * 6 + 1 and all(not p.any() for p in norms)


# ---------------------------------------------------------------- bad input


def test_unknown_hf_architecture_is_named_before_any_weight(tmp_path: Path,
                                                            monkeypatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 8}))
    save_file({"backbone.embeddings.weight": torch.zeros(8, 4)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setattr(source_module, "safetensors_weights", _no_weights)
    with pytest.raises(ValueError, match=r"'mamba' is not supported; .*llama.*gemma3_text"):
        load_source(tmp_path)


def test_unknown_gguf_architecture_is_named_before_any_weight(tmp_path: Path,
                                                              monkeypatch) -> None:
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(source_module, "gguf_weights", _no_weights)
    with pytest.raises(ValueError, match=r"'mamba' is not supported; .*qwen3, gemma3"):
        load_source(tmp_path / "m.gguf")


def _no_weights(*args, **kwargs):
    raise AssertionError("a weight was read")


def test_unknown_load_format() -> None:
    with pytest.raises(ValueError, match="load_format"):
        load_source(None, load_format="pt")


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_source(None, dtype=torch.int8)


@pytest.mark.parametrize("model", ["/no/such/folder", "./missing", "missing.gguf", "cfg.json", ""])
def test_nonexistent_local_path(model: str) -> None:
    with pytest.raises(ValueError, match="model"):
        load_source(model)


def test_hub_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match="no-such-org/no-such-model") as err:
        load_source("no-such-org/no-such-model")
    assert "pass a local folder or .gguf file" in str(err.value)
    assert time.monotonic() - start < 5.0


def test_hub_id_with_gguf_format_is_refused() -> None:
    with pytest.raises(ValueError, match="load_format='gguf'"):
        load_source("org/model", load_format="gguf")


def test_bare_config_needs_dummy(tmp_path: Path) -> None:
    tiny_model("llama_tied").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dummy"):
        load_source(tmp_path / "config.json")
    with pytest.raises(ValueError, match="safetensors"):  # config.json, but no weights
        load_source(tmp_path)


def test_ambiguous_gguf_folder(tmp_path: Path) -> None:
    model = tiny_model("llama_tied")
    write_gguf(tmp_path / "a.gguf", model)
    write_gguf(tmp_path / "b.gguf", model)
    with pytest.raises(ValueError, match="several"):
        load_source(tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        load_source(tmp_path / "a.gguf", load_format="safetensors")
