"""The decoder every family runs on (`LlamaModel`), and the Llama family itself (llama,
mistral): its config adapter and checkpoint names. Qwen2 and Qwen3 are this decoder with
their flags (model/qwen.py); Gemma 3 declares its differences on a subclass (model/gemma3.py).

The model never owns key/value memory: each layer hands its rotated q/k/v to an `Attend`
callback supplied by the runner (an `AttentionBackend`, attention/backend.py), which reads
and writes the state buffers in place and applies the eviction policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tova_engine.model.config import ModelConfig, shared_hf_fields
from tova_engine.model.fp8 import Fp8Linear, use_fp8_linears
from tova_engine.model.rope import (
    apply_rope,
    inverse_frequencies,
    local_inverse_frequencies,
    rope_cos_sin,
)
from tova_engine.model.sharding import local_config, shard_hf_tensor, vocab_shard
from tova_engine.parallel import SINGLE, TensorParallel

# (layer index, q [T, heads, head_dim], k [T, kv_heads, head_dim], v) -> out [T, heads, head_dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    # Gemma's norm scales by (1 + weight) (model/gemma3.py); the fused kernel takes either.
    unit_offset = False

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), self.identity))
        self.eps = eps
        self.kernel: Callable | None = None  # fused Triton version (kernels/elementwise.py)

    @property
    def identity(self) -> float:
        """The weight that leaves normalised activations unchanged."""
        return 0.0 if self.unit_offset else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, unit_offset=self.unit_offset)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's version. Normalise in at least float32 (half precision loses the mean)."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and the next norm, fused."""
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual, unit_offset=self.unit_offset)
        summed = residual + x
        return self(summed), summed


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, tp: TensorParallel = SINGLE, norm: type[RMSNorm] = RMSNorm
    ) -> None:
        """config: this rank's shapes (its share of the heads, `sharding.local_config`);
        norm: the per-head q/k norms' style, when the config has them."""
        super().__init__()
        self.tp = tp
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        # q, k and v in one matmul: one kernel instead of three per layer.
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.rope_kernel: Callable | None = None  # fused Triton RoPE of q and k
        # Each head's queries and keys RMS-normalised before RoPE (replicated weights).
        self.q_norm = norm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = norm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def head_norms(self):
        """The q/k norms as the fused RoPE kernel takes them (None without them)."""
        if self.q_norm is None:
            return None
        from tova_engine.kernels.elementwise import HeadNorms

        return HeadNorms(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                         self.q_norm.unit_offset)  # fmt: skip

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, attend: Attend
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.rope_kernel is not None:  # the heads' norms, if any, in the same launch
            q, k = self.rope_kernel(qkv, cos, sin, self.num_heads, self.num_kv_heads)
        else:
            q = q.reshape(tokens, self.num_heads, self.head_dim)
            k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        out = attend(layer, q, k, v)
        # Row-parallel: each rank's heads give a partial sum of the projection.
        return self.tp.all_reduce(self.o_proj(out.reshape(tokens, self.q_size)))


# The gated MLP's activations by name (the fused kernel knows the same names).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(
        self, config: ModelConfig, tp: TensorParallel = SINGLE, activation: str = "silu"
    ) -> None:
        super().__init__()
        self.tp = tp
        self.activation = activation  # act(gate) * up, a name in ACTIVATIONS
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_kernel: Callable | None = None  # fused Triton act(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act_kernel is not None:
            hidden = self.act_kernel(gate_up, self.activation)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = ACTIVATIONS[self.activation](gate) * up
        return self.tp.all_reduce(self.down_proj(hidden))


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, index: int, tp: TensorParallel, family: type[LlamaModel]
    ) -> None:
        """config: this rank's shapes; family: the model class whose declared differences
        (norm style, activation, sandwich norms) the layer is built with."""
        super().__init__()
        self.index = index
        self.sliding = config.layer_window(index) is not None
        size, eps, norm = config.hidden_size, config.rms_norm_eps, family.norm_class
        self.attn_norm = norm(size, eps)
        self.attn = Attention(config, tp, norm)
        self.mlp_norm = norm(size, eps)
        self.mlp = MLP(config, tp, family.activation)
        # Sandwich norms (Gemma): attention's and the MLP's outputs normed before they join
        # the residual; without them the outputs join it as they are.
        sandwich = family.sandwich_norms
        self.attn_out_norm = norm(size, eps) if sandwich else nn.Identity()
        self.mlp_out_norm = norm(size, eps) if sandwich else nn.Identity()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos, sin, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at layer 0); residual: the
        running sum it is added to (None at layer 0). Returns (MLP output, residual): each
        residual add happens inside the next norm, fused on CUDA."""
        if residual is None:
            h, residual = self.attn_norm(x), x
        else:
            h, residual = self.attn_norm.add_forward(x, residual)
        x = self.attn_out_norm(self.attn(h, cos, sin, self.index, attend))
        h, residual = self.mlp_norm.add_forward(x, residual)
        return self.mlp_out_norm(self.mlp(h)), residual


class VocabParallelEmbedding(nn.Embedding):
    """This rank's block of the embedding's rows; ids held elsewhere look up zeros, and the
    all-reduce adds the rank that holds each id."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        self.start, self.end = vocab_shard(vocab_size, tp)
        super().__init__(self.end - self.start, hidden_size)
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.end - self.start)
        x = super().forward(local.clamp(0, self.end - self.start - 1))
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0.0))


# A layer's Hugging Face tensor name (after "model.layers.N.") -> (our parameter under
# "layers.N.", the part of a fused parameter it fills or None).
LayerNames = dict[str, tuple[str, str | None]]

# What every family names alike: the projections (q/k/v and gate/up fused into one matmul
# each) and the per-head q/k norms.
SHARED_LAYER_NAMES: LayerNames = {
    "self_attn.o_proj.weight": ("attn.o_proj.weight", None),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", None),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", None),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", None),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", "gate"),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", "up"),
    **{
        f"self_attn.{p}_proj.{kind}": (f"attn.qkv_proj.{kind}", p)
        for p in "qkv"
        for kind in ("weight", "bias")
    },
}
# Llama's two norms: before attention and before the MLP.
LLAMA_LAYER_NAMES: LayerNames = {
    **SHARED_LAYER_NAMES,
    "input_layernorm.weight": ("attn_norm.weight", None),
    "post_attention_layernorm.weight": ("mlp_norm.weight", None),
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class LlamaModel(nn.Module):
    """Token ids and positions in, hidden states out; each layer's attention runs through
    the runner's `Attend`. What a config says (q/k/v biases, q/k norms, sliding layers with
    their own RoPE base) needs no subclass; a family that differs from Llama in the places
    below subclasses this and declares them (model/gemma3.py)."""

    norm_class: ClassVar[type[RMSNorm]] = RMSNorm  # every norm's style, q/k norms' included
    activation: ClassVar[str] = "silu"  # the gated MLP's act(gate) * up
    sandwich_norms: ClassVar[bool] = False  # `DecoderLayer`'s output norms
    scales_embedding: ClassVar[bool] = False  # embeddings times sqrt(hidden_size)
    layer_names: ClassVar[LayerNames] = LLAMA_LAYER_NAMES  # the checkpoint's layer tensors
    # A wrapper checkpoint's prefixes before the text model's names -> what they stand for.
    wrapper_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        """config: the whole model's; with tp, this rank builds its shard only."""
        super().__init__()
        self.config = config
        self.tp = tp
        self.local = local_config(config, tp)
        if tp.enabled:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(self.local, i, tp, type(self)) for i in range(config.num_layers)
        )
        self.norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        vocab_rows = self.embed_tokens.weight.shape[0]
        self.lm_head = nn.Linear(config.hidden_size, vocab_rows, bias=False)
        self._tie_weights()
        # Float32 frequencies, recomputed on the device by `reset_buffers`.
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)
        if config.has_sliding_layers:
            inv_freq_local = local_inverse_frequencies(config)
            self.register_buffer("inv_freq_local", inv_freq_local, persistent=False)
        if self.scales_embedding:
            embed_scale = self._embed_scale(torch.float32)
            self.register_buffer("embed_scale", embed_scale, persistent=False)

    @classmethod
    def empty(
        cls,
        config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        tp: TensorParallel = SINGLE,
        quantization: str | None = None,
    ) -> LlamaModel:
        """Uninitialised `dtype` weights on `device`, built on the meta device so that no
        float32 copy exists on the way (an 8B model would need 32 GB of it); fill them with
        `load_hf_weights` or `init_random_weights`. quantization "fp8": the projections'
        weights in float8 (model/fp8.py)."""
        with torch.device("meta"):
            model = cls(config, tp)
        model = model.to(dtype=dtype)
        if quantization == "fp8":
            use_fp8_linears(model)
        model = model.to_empty(device=device)
        model._tie_weights()  # to_empty gives every parameter its own storage
        model.reset_buffers()
        return model

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        if self.scales_embedding:
            x = x * self.embed_scale
        # cos, sin [T, head_dim // 2] of each layer kind (sliding: True), computed once.
        rope = {False: rope_cos_sin(positions, self.inv_freq, x.dtype)}
        if self.config.has_sliding_layers:
            rope[True] = rope_cos_sin(positions, self.inv_freq_local, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, *rope[layer.sliding], attend)
        return self.norm.add_forward(x, residual)[0]

    @torch.inference_mode()
    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in the model's dtype, every rank's block gathered."""
        logits = self.lm_head(hidden)
        if self.tp.enabled:  # each rank's vocabulary block, gathered once
            logits = self.tp.all_gather_last(logits)[:, : self.config.vocab_size]
        return logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab], at least float32 (sampling and log-probs want it)."""
        logits = self.vocab_logits(hidden)
        return logits if logits.dtype == torch.float64 else logits.float()

    def use_triton_kernels(self) -> None:
        """Fused RMSNorm (+ residual), q/k norm + RoPE and gated-activation kernels instead of
        PyTorch ops (CUDA)."""
        from tova_engine.kernels import elementwise

        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = elementwise.rms_norm
            elif isinstance(module, Attention):
                module.rope_kernel = partial(elementwise.rope, norms=module.head_norms())
            elif isinstance(module, MLP):
                module.act_kernel = elementwise.gated_activation

    def reset_buffers(self) -> None:
        """Recompute the RoPE frequencies in float32 on the model's device: `.to(dtype)` casts
        buffers too, and bf16 frequencies put positions in the thousands radians off."""
        weight = self.embed_tokens.weight
        self.inv_freq = inverse_frequencies(self.config).to(weight.device)
        if self.config.has_sliding_layers:
            self.inv_freq_local = local_inverse_frequencies(self.config).to(weight.device)
        if self.scales_embedding:
            self.embed_scale = self._embed_scale(weight.dtype).to(weight.device)

    def _embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        # sqrt(hidden) as transformers holds it (float32), then rounded to the weights' dtype.
        return torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(dtype)

    def init_random_weights(self, seed: int) -> None:
        """Random weights with a trained model's scale, for `load_format="dummy"`; drawn on
        the parameters' device (an 8B model's worth of CPU draws would take minutes)."""
        device = self.embed_tokens.weight.device
        # Each rank draws its own shard (dummy weights need not match another size's).
        generator = torch.Generator(device=device).manual_seed(seed + 7919 * self.tp.rank)
        # Norms start as the identity of their own style (Gemma's (1 + weight) at zeros).
        norms = {id(m.weight): m.identity for m in self.modules() if isinstance(m, RMSNorm)}
        fp8 = {id(m.weight): m for m in self.modules() if isinstance(m, Fp8Linear)}
        scales = {id(m.weight_scale) for m in fp8.values()}
        with torch.no_grad():
            for param in self.parameters():
                if id(param) in norms:
                    param.fill_(norms[id(param)])
                elif id(param) not in scales:  # FP8 rows get theirs as they are quantized
                    noise = torch.randn(param.shape, generator=generator, device=device)
                    if id(param) in fp8:
                        fp8[id(param)].load_rows(0, noise * 0.02)
                    else:
                        param.copy_(noise * 0.02)

    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in Hugging Face checkpoints, fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unscaled: set[str] = set()  # float8 weights whose scales have not come yet
        for hf_name, tensor in weights:
            hf_name = self._text_model_name(hf_name)
            scale_of = hf_name.removesuffix("_scale") if hf_name.endswith(".weight_scale") \
                else None
            target = self._map_hf_name(scale_of or hf_name)
            if target is None:
                continue
            name, row_offset = self._resolve_fused(*target)
            tensor = shard_hf_tensor(hf_name, tensor, self.config, self.tp)
            owner = self.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(owner, Fp8Linear) and name.endswith(".weight"):
                if scale_of is not None:
                    owner.load_scales(row_offset, tensor)
                    unscaled.discard(scale_of)
                elif owner.load_rows(row_offset, tensor):
                    unscaled.add(hf_name)
            elif scale_of is not None:
                raise ValueError(f"checkpoint tensor {hf_name}: FP8 scales, but the model "
                                 "was not built with quantization='fp8'")
            else:
                with torch.no_grad():
                    params[name][row_offset : row_offset + tensor.shape[0]].copy_(tensor)
            if scale_of is None:
                loaded.add(hf_name)
        if unscaled:
            raise ValueError(f"checkpoint: FP8 weight {sorted(unscaled)[0]} has no "
                             "weight_scale tensor")
        missing = sorted(self._expected_hf_names(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _text_model_name(self, hf_name: str) -> str:
        for prefix, replacement in self.wrapper_prefixes:
            if hf_name.startswith(prefix):
                return replacement + hf_name.removeprefix(prefix)
        return hf_name

    def _map_hf_name(self, hf_name: str) -> tuple[str, str | None] | None:
        """HF tensor name -> (our parameter name, fused part or None); None for tensors we do
        not use (e.g. precomputed rotary tables, a wrapper's vision tower)."""
        if hf_name in _TOP_NAMES:
            return _TOP_NAMES[hf_name], None
        match = _LAYER_NAME.fullmatch(hf_name)
        if not match or match.group(2) not in self.layer_names:
            return None
        name, part = self.layer_names[match.group(2)]
        return f"layers.{match.group(1)}.{name}", part

    def _expected_hf_names(self, params: dict[str, nn.Parameter]) -> set[str]:
        """Every checkpoint name that fills one of `params` (a tied head has no parameter of
        its own, so it expects no lm_head)."""
        expected = {hf for hf, name in _TOP_NAMES.items() if name in params}
        for i in range(self.config.num_layers):
            expected |= {
                f"model.layers.{i}.{hf}"
                for hf, (name, _) in self.layer_names.items()
                if f"layers.{i}.{name}" in params
            }
        return expected

    def _resolve_fused(self, name: str, part: str | None) -> tuple[str, int]:
        if part is None:
            return name, 0
        c = self.local  # offsets inside this rank's fused blocks
        offsets = {
            "q": 0,
            "k": c.num_heads * c.head_dim,
            "v": (c.num_heads + c.num_kv_heads) * c.head_dim,
            "gate": 0,
            "up": c.intermediate_size,
        }
        return name, offsets[part]


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    """The adapter of model_type llama and mistral: q/k/v biases where the config declares
    them. Mistral's sliding_window is not honoured: every layer runs full."""
    return ModelConfig(**shared_hf_fields(hf), attention_bias=bool(hf.get("attention_bias")))
