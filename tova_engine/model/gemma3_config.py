"""Gemma 3's config.json (text model, or the multimodal wrapper's `text_config`) read into a
`ModelConfig`, with transformers' `Gemma3TextConfig` defaults for absent keys (multimodal
configs spell out only what differs from them)."""

from __future__ import annotations

from typing import Any

from tova_engine.model.config import FULL, LAYER_TYPES, SLIDING, ModelConfig, shared_hf_fields

# transformers' Gemma3TextConfig defaults (the 4B model's text shapes).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
# Every released Gemma 3 has one global layer after five local ones.
DEFAULT_SLIDING_PATTERN = 6


def gemma3_config(hf: dict[str, Any]) -> ModelConfig:
    """The adapter of model_type gemma3 and gemma3_text: per-head q/k norms, the sliding
    layers with their window and RoPE base, the attention scalar."""
    text = _text_config(hf)
    return ModelConfig(
        **shared_hf_fields(text),
        qk_norm=True,
        layer_types=tuple(text["layer_types"]),
        sliding_window=text["sliding_window"],
        rope_local_theta=float(text["rope_local_base_freq"]),
        query_pre_attn_scalar=float(text["query_pre_attn_scalar"]),
    )


def _text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A `gemma3` (multimodal) or `gemma3_text` config dict -> a flat text config dict in the
    4.x spelling (rope_theta, rope_scaling, rope_local_base_freq) with layer_types filled."""
    wrapper = hf.get("model_type") == "gemma3"
    text = dict(hf.get("text_config") or {}) if wrapper else dict(hf)
    if wrapper:  # what the wrapper says for the whole model (instruct models stop on 106 too)
        for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id"):
            if hf.get(key) is not None:
                text.setdefault(key, hf[key])
    for key, value in _DEFAULTS.items():
        if text.get(key) is None:
            text[key] = value
    _refuse_unsupported(text)
    _flatten_rope(text)
    text["layer_types"] = _layer_types(text)
    text["model_type"] = "gemma3_text"
    return text


def _refuse_unsupported(text: dict[str, Any]) -> None:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if text.get(key) is not None:
            raise ValueError(f"gemma3: {key} is not supported (Gemma 3 releases leave it unset)")
    if text.get("use_bidirectional_attention"):
        raise ValueError("gemma3: use_bidirectional_attention is not supported (causal only)")
    if text.get("attention_bias"):
        raise ValueError("gemma3: attention_bias is not supported (Gemma 3 has none)")
    if text["hidden_activation"] != "gelu_pytorch_tanh":
        raise ValueError(
            f"gemma3: hidden_activation {text['hidden_activation']!r} is not supported; "
            "supported: gelu_pytorch_tanh"
        )


def _flatten_rope(text: dict[str, Any]) -> None:
    """transformers 5 keeps one rope_parameters dict per layer type; 4.x kept rope_theta,
    rope_scaling (global layers) and rope_local_base_freq (local layers)."""
    per_type = text.pop("rope_parameters", None) or {}
    if FULL in per_type or SLIDING in per_type:
        full = dict(per_type.get(FULL) or {})
        local = dict(per_type.get(SLIDING) or {})
        text["rope_theta"] = full.pop("rope_theta", text["rope_theta"])
        text["rope_scaling"] = full or None
        text["rope_local_base_freq"] = local.pop("rope_theta", text["rope_local_base_freq"])
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"gemma3: scaled RoPE on sliding layers ({local}) is not supported")


def _layer_types(text: dict[str, Any]) -> list[str]:
    layers = text["num_hidden_layers"]
    types = text.get("layer_types")
    if types is None:
        pattern = (
            text.get("sliding_window_pattern")
            or text.get("_sliding_window_pattern")
            or DEFAULT_SLIDING_PATTERN
        )
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    types = list(types)
    if len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(
            f"gemma3: layer_types must name {layers} layers, each one of {', '.join(LAYER_TYPES)}; "
            f"got {types}"
        )
    return types
