"""Gemma 3 (text): the Llama-family decoder with Gemma's differences, as transformers'
`Gemma3ForCausalLM` has them.

  * RMSNorm scales by (1 + weight), in float32, and casts back last;
  * four norms per layer: before attention (input), after it (post_attention), before the
    MLP (pre_feedforward) and after it (post_feedforward), each output normalised before it
    joins the residual;
  * per-head q/k norms before RoPE, attention logits scaled by query_pre_attn_scalar ** -0.5
    (the attention backends read it from the state, `KVState.attention_scalar`);
  * the embedding scaled by sqrt(hidden_size), rounded to the embedding's dtype first;
  * gelu(tanh) gating in the MLP;
  * sliding-window (local) layers, with their own RoPE base and no scaling, between global
    ones. A local layer's state is a window by construction (state.py sizes it).
"""

from __future__ import annotations

import torch
from torch import nn

from tova_engine.model.config import ModelConfig
from tova_engine.model.llama import MLP, Attend, Attention, LlamaModel, RMSNorm
from tova_engine.model.rope import local_inverse_frequencies, rope_cos_sin
from tova_engine.parallel import SINGLE, TensorParallel


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), in float32, cast back last (the fused kernel's
    `unit_offset` style)."""

    unit_offset = True

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (wide * (1.0 + self.weight.to(wide.dtype))).to(x.dtype)


class GemmaAttention(Attention):
    def _head_norm(self, config: ModelConfig) -> RMSNorm:
        return GemmaRMSNorm(config.head_dim, config.rms_norm_eps)


class GemmaMLP(MLP):
    activation = "gelu_tanh"


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.index = index
        self.sliding = config.layer_window(index) is not None
        eps = config.rms_norm_eps
        self.input_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.attn = GemmaAttention(config, tp)
        self.post_attention_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = GemmaMLP(config, tp)
        self.post_feedforward_norm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos, sin, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same contract as `DecoderLayer.forward`: x is the previous layer's (normed)
        MLP output, added to `residual` inside this layer's input norm."""
        if residual is None:
            h, residual = self.input_norm(x), x
        else:
            h, residual = self.input_norm.add_forward(x, residual)
        x = self.post_attention_norm(self.attn(h, cos, sin, self.index, attend))
        h, residual = self.pre_feedforward_norm.add_forward(x, residual)
        return self.post_feedforward_norm(self.mlp(h)), residual


class Gemma3Model(LlamaModel):
    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__(config, tp)
        self.register_buffer("inv_freq_local", local_inverse_frequencies(config), persistent=False)
        self.register_buffer("embed_scale", self._embed_scale(torch.float32), persistent=False)

    def _make_layer(self, index: int) -> nn.Module:
        return GemmaDecoderLayer(self.local, index, self.tp)

    def _make_norm(self, size: int) -> nn.Module:
        return GemmaRMSNorm(size, self.config.rms_norm_eps)

    def _layer_norm_names(self) -> tuple[str, ...]:
        return tuple(
            f"{norm}.weight"
            for norm in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            )
        )

    def _embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        # sqrt(hidden) as transformers holds it (float32), then rounded to the weights' dtype.
        return torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(dtype)

    def reset_buffers(self) -> None:
        super().reset_buffers()
        weight = self.embed_tokens.weight
        self.inv_freq_local = local_inverse_frequencies(self.config).to(weight.device)
        self.embed_scale = self._embed_scale(weight.dtype).to(weight.device)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids) * self.embed_scale
        rope = {
            False: rope_cos_sin(positions, self.inv_freq, x.dtype),
            True: rope_cos_sin(positions, self.inv_freq_local, x.dtype),
        }
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, *rope[layer.sliding], attend)
        return self.norm.add_forward(x, residual)[0]


def model_class(config: ModelConfig) -> type[LlamaModel]:
    """The decoder class a config's family runs on."""
    return Gemma3Model if config.is_gemma3 else LlamaModel
