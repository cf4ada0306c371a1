"""Qwen2 and Qwen3 (dense): the Llama decoder with their flags. Their configs' sliding-window
settings are not honoured: every layer runs full."""

from __future__ import annotations

from typing import Any

from tova_engine.model.config import ModelConfig, shared_hf_fields


def qwen2_config(hf: dict[str, Any]) -> ModelConfig:
    """The adapter of model_type qwen2: q/k/v biases, always."""
    return ModelConfig(**shared_hf_fields(hf), attention_bias=True)


def qwen3_config(hf: dict[str, Any]) -> ModelConfig:
    """The adapter of model_type qwen3: each head's queries and keys RMS-normalised before
    RoPE; q/k/v biases where the config declares them."""
    return ModelConfig(
        **shared_hf_fields(hf), attention_bias=bool(hf.get("attention_bias")), qk_norm=True
    )
