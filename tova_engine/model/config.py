"""Architecture description of a Llama-family or Gemma 3 decoder, read from a Hugging Face
config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tova_engine.model.gemma3_config import SLIDING, gemma3_text_config

# gemma3 is the multimodal wrapper: its text_config is read (as gemma3_text).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
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
    # Qwen3: RMSNorm over each head's queries and keys before RoPE.
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Gemma 3: per layer "sliding_attention" (a query sees the last `sliding_window`
    # positions, itself included) or "full_attention"; empty: every layer is full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # sliding layers' RoPE base (no scaling)
    # Attention logits are scaled by query_pre_attn_scalar ** -0.5 (Gemma), else head_dim's.
    query_pre_attn_scalar: float | None = None

    def __post_init__(self) -> None:
        check_model_type(self.model_type)
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
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gemma3(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def attention_scalar(self) -> float:
        """Attention logits are q.k / sqrt(this)."""
        return self.query_pre_attn_scalar or self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a local layer (positions a query sees, itself included);
        None for a global layer."""
        if self.layer_types and self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
        model_type = hf.get("model_type", "llama")
        check_model_type(model_type)  # before reading keys another family may lack
        if model_type in ("gemma3", "gemma3_text"):
            hf = gemma3_text_config(hf)
            model_type = hf["model_type"]
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type", "default") == "default":
            rope = {}
        gemma = model_type == "gemma3_text"
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
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
            # qwen2 always has q/k/v biases; llama may declare them.
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3" or gemma,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            # Only Gemma's sliding layers are honoured; other families run every layer full.
            layer_types=tuple(hf["layer_types"]) if gemma else (),
            sliding_window=hf["sliding_window"] if gemma else None,
            rope_local_theta=_optional_float(hf.get("rope_local_base_freq")),
            query_pre_attn_scalar=_optional_float(hf.get("query_pre_attn_scalar")),
        )


def check_model_type(model_type: object) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
