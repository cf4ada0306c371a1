"""The architecture description every decoder is built from (`ModelConfig`), and the
config.json fields that every family spells alike; a family's own fields and flags are read
by its adapter (model/registry.py names them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Hugging Face's names for a layer's attention kind (config.json "layer_types").
SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor": ..., ...} or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Per layer SLIDING (a query sees the last `sliding_window` positions, itself included)
    # or FULL; empty: every layer is full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # sliding layers' RoPE base (no scaling)
    # Attention logits are scaled by query_pre_attn_scalar ** -0.5 (Gemma), else head_dim's.
    query_pre_attn_scalar: float | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, the model has "
                             f"{self.num_layers}")
        if SLIDING in self.layer_types and (self.sliding_window or 0) < 1:
            raise ValueError(f"sliding layers need sliding_window >= 1; got {self.sliding_window}")

    @property
    def attention_scalar(self) -> float:
        """Attention logits are q.k / sqrt(this)."""
        return self.query_pre_attn_scalar or self.head_dim

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a local layer (positions a query sees, itself included);
        None for a global layer."""
        if self.layer_types and self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None


def shared_hf_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields every family spells alike in a Hugging Face config.json
    (transformers 4.x or 5.x): shapes, RoPE, the norms' eps, tied embeddings, special tokens.
    A family's adapter adds its own flags to them."""
    num_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    if rope.get("rope_type", "default") == "default":
        rope = {}
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return dict(
        model_type=hf.get("model_type", "llama"),
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope or None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
