"""Read a llama.cpp GGUF file: config, dequantized weights under Hugging Face names, tokenizer.

What llama.cpp's converter did differently per architecture is declared once (`GGUF_ARCHS`)
and undone here, so that the model families only ever see Hugging Face configs and names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tova_engine.model.config import FULL, SLIDING
from tova_engine.model.gemma3_config import DEFAULT_SLIDING_PATTERN

logger = logging.getLogger("tova_engine")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 names its four norms apart: ffn_norm is the one before the MLP, and the
# post-attention one is a norm of its own.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")
# Holds llama.cpp's baked Llama 3 rope factors; it becomes config.rope_scaling, not a weight.
_ROPE_FREQS = "rope_freqs.weight"
# Every Llama 3.1/3.2/3.3 release uses these; only `factor` varies (8 or 32).
_LLAMA3_ROPE_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def open_gguf(path: Path) -> GGUFReader:
    """Memory-maps the file; tensors are read only when dequantized."""
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"model: {path} is not a readable GGUF file: {e}") from e


def gguf_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """The Hugging Face config.json dict equivalent to the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    spec = gguf_arch(reader)
    tensors = {t.name: t for t in reader.tensors}
    hidden = _required(reader, f"{arch}.embedding_length")
    heads = _required(reader, f"{arch}.attention.head_count")
    theta = _float32_decimal(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    head_dim = (
        _field(reader, f"{arch}.attention.key_length")
        or _field(reader, f"{arch}.rope.dimension_count")
        or hidden // heads
    )
    hf = {
        "model_type": spec.model_type,
        "vocab_size": _vocab_size(reader, arch, tensors),
        "hidden_size": hidden,
        "intermediate_size": _required(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _required(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _kv_heads(reader, arch, heads),
        "head_dim": head_dim,
        "max_position_embeddings": _required(reader, f"{arch}.context_length"),
        "rms_norm_eps": _float32_decimal(
            _required(reader, f"{arch}.attention.layer_norm_rms_epsilon")
        ),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, tensors, head_dim, theta),
        # llama.cpp drops output.weight when the head shares the embedding.
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _stop_ids(reader),
    }
    if spec.extra_fields is not None:
        hf.update(spec.extra_fields(reader, hf))
    return hf


def gemma3_fields(reader: GGUFReader, hf: dict[str, Any]) -> dict[str, Any]:
    """What a gemma3 GGUF adds, with llama.cpp's own values for what it does not store: the
    local layers' RoPE base (10000) and their pattern (five local, one global), and the
    attention scalar (hidden / heads for the 62-layer 27B, head_dim otherwise)."""
    layers, head_dim = hf["num_hidden_layers"], hf["head_dim"]
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern", DEFAULT_SLIDING_PATTERN)
    if isinstance(pattern, list):  # one flag per layer (True: sliding), as newer files write
        types = [SLIDING if sliding else FULL for sliding in pattern]
    else:  # every pattern-th layer is global
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    scalar = hf["hidden_size"] // hf["num_attention_heads"] if layers == 62 else head_dim
    return {
        "sliding_window": _required(reader, "gemma3.attention.sliding_window"),
        "layer_types": types,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scalar,
        "hidden_activation": "gelu_pytorch_tanh",
    }


def gguf_weights(
    reader: GGUFReader, hf: dict[str, Any], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize one tensor at a time, yielding (HF name, tensor in HF [out, in] layout)."""
    spec = gguf_arch(reader)
    permuted = {"attn_q": hf["num_attention_heads"], "attn_k": hf["num_key_value_heads"]}
    for tensor, hf_name in gguf_name_map(reader):
        # dequantize returns numpy's reversed GGUF shape, which is already HF's [out, in].
        array = dequantize(tensor.data, tensor.tensor_type)
        kind = tensor.name.split(".")[-2]
        if spec.permuted_qk and kind in permuted:
            array = unpermute_rope_rows(array, permuted[kind])
        if spec.norms_plus_one and hf_name.endswith("norm.weight"):
            array = array - np.float32(1.0)
        yield hf_name, _to_torch(array, dtype)


def gguf_name_map(reader: GGUFReader) -> list[tuple[ReaderTensor, str]]:
    """(tensor, HF name) pairs, built up front so that an unknown tensor fails before loading."""
    names = gguf_arch(reader).block_names
    return [(t, _hf_name(t.name, names)) for t in reader.tensors if t.name != _ROPE_FREQS]


class GgufArch(NamedTuple):
    """What llama.cpp's converter wrote differently for one architecture."""

    model_type: str  # the Hugging Face family it reads as
    block_names: dict[str, str]  # blk.N.<name> -> the HF layer's tensor name
    # q/k rows permuted for llama.cpp's adjacent-pair RoPE (its llama converter only).
    permuted_qk: bool = False
    # Norm weights stored with the 1 of Gemma's (1 + weight) added; HF's (and this engine's)
    # weight excludes it.
    norms_plus_one: bool = False
    # Metadata the architecture adds to the shared fields, as config.json keys.
    extra_fields: Callable[[GGUFReader, dict[str, Any]], dict[str, Any]] | None = None


GGUF_ARCHS = {
    "llama": GgufArch("llama", _BLOCK_NAMES, permuted_qk=True),
    "qwen2": GgufArch("qwen2", _BLOCK_NAMES),
    "qwen3": GgufArch("qwen3", _BLOCK_NAMES),
    # "gemma3" would name the multimodal wrapper; the file holds the text model.
    "gemma3": GgufArch(
        "gemma3_text", _GEMMA3_BLOCK_NAMES, norms_plus_one=True, extra_fields=gemma3_fields
    ),
}


def gguf_arch(reader: GGUFReader) -> GgufArch:
    """The file's architecture, refused with the supported ones named if it is not one."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHS)}"
        )
    return GGUF_ARCHS[arch]


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py LlamaModel.permute).

    HF's rotate_half pairs row j with row j + D/2 of each head; llama.cpp's rope pairs adjacent
    rows, so its converter reshapes each head to [2, D/2] and transposes to [D/2, 2]. The
    inverse reads the stored rows as [D/2, 2] and transposes back. Works for weights and biases.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tokenizer(reader: GGUFReader, path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer (with its chat template) stored in the file, or None when it has none."""
    if reader.get_field("tokenizer.ggml.model") is None:
        return None
    # transformers re-reads the file's vocabulary itself (~4 s for a 49k vocabulary).
    logger.info("reading the tokenizer from %s", path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)


def _hf_name(gguf_name: str, block_names: dict[str, str]) -> str:
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, suffix = m.groups()
        if part in block_names:
            return f"model.layers.{layer}.{block_names[part]}.{suffix}"
    elif (m := _GLOBAL_RE.fullmatch(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama-family equivalent")


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # F32/F16 tensors come back as read-only views of the memory map: copy them out.
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(dtype)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _required(reader: GGUFReader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return value


def _float32_decimal(value: float) -> float:
    # GGUF stores float32; its shortest decimal (1e-05, not 9.9999997e-06) is config.json's value.
    return float(str(np.float32(value)))


def _vocab_size(reader: GGUFReader, arch: str, tensors: dict[str, Any]) -> int:
    # The embedding's row count (GGUF shape [hidden, vocab]) is the truth without metadata.
    return _field(reader, f"{arch}.vocab_size") or int(tensors["token_embd.weight"].shape[1])


def _kv_heads(reader: GGUFReader, arch: str, heads: int) -> int:
    kv = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, list):  # per-layer counts (hybrid models): only uniform ones are Llama
        if len(set(kv)) != 1:
            raise ValueError(f"GGUF per-layer head_count_kv {kv} is not supported")
        kv = kv[0]
    return kv


def _stop_ids(reader: GGUFReader) -> list[int]:
    # Llama 3 chat models end turns with eot/eom, not eos; generation must stop on all three.
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [_field(reader, f"tokenizer.ggml.{key}") for key in keys]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _rope_scaling(
    reader: GGUFReader, arch: str, tensors: dict[str, Any], head_dim: int, theta: float
) -> dict[str, Any] | None:
    if _ROPE_FREQS in tensors:
        factors = dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        return llama3_rope_scaling(np.asarray(factors, dtype=np.float64), head_dim, theta)
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if (factor := _field(reader, f"{arch}.rope.scaling.factor")) is not None:
        scaling["factor"] = float(factor)
    if (orig := _field(reader, f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = orig
    return scaling  # ModelConfig rejects the types our forward pass cannot run (yarn ...)


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency rope_freqs tensor.

    The tensor stores only the resulting factors; we assume the published Llama 3.x constants
    and check that they reproduce every factor, so a non-standard file fails loudly.
    """
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), **_LLAMA3_ROPE_DEFAULTS}
    if not np.allclose(llama3_rope_factors(scaling, head_dim, theta), factors, rtol=1e-4):
        raise ValueError(
            "GGUF rope_freqs do not match Llama 3 rope scaling (low 1, high 4, original 8192); "
            "load the model's safetensors folder instead"
        )
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of inv_freq, as llama.cpp's converter computes them."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    orig, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)
