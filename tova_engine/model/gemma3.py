"""Gemma 3 (text): the shared decoder with Gemma's differences declared, as transformers'
`Gemma3ForCausalLM` has them.

  * RMSNorm scales by (1 + weight), in float32, and casts back last;
  * sandwich norms: four per layer, before attention (input_layernorm), after it
    (post_attention_layernorm), before the MLP (pre_feedforward_layernorm) and after it
    (post_feedforward_layernorm), each output normalised before it joins the residual;
  * gelu(tanh) gating in the MLP;
  * the embedding scaled by sqrt(hidden_size), rounded to the embedding's dtype first;
  * the multimodal wrapper's checkpoint read for its text model.

What its config says the shared decoder does as it reads it (model/gemma3_config.py): per-head
q/k norms before RoPE, attention logits scaled by query_pre_attn_scalar ** -0.5 (the attention
backends read it from the state, `KVState.attention_scalar`), and sliding-window (local)
layers, with their own RoPE base and no scaling, between global ones. A local layer's state is
a window by construction (state/kv_state.py sizes it).
"""

from __future__ import annotations

import torch

from tova_engine.model.llama import SHARED_LAYER_NAMES, LayerNames, LlamaModel, RMSNorm


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), in float32, cast back last (the fused kernel's
    `unit_offset` style)."""

    unit_offset = True

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (wide * (1.0 + self.weight.to(wide.dtype))).to(x.dtype)


# Gemma's post_attention_layernorm follows attention; pre_feedforward_layernorm is the one
# before the MLP.
GEMMA3_LAYER_NAMES: LayerNames = {
    **SHARED_LAYER_NAMES,
    "input_layernorm.weight": ("attn_norm.weight", None),
    "post_attention_layernorm.weight": ("attn_out_norm.weight", None),
    "pre_feedforward_layernorm.weight": ("mlp_norm.weight", None),
    "post_feedforward_layernorm.weight": ("mlp_out_norm.weight", None),
}


class Gemma3Model(LlamaModel):
    norm_class = GemmaRMSNorm
    activation = "gelu_tanh"
    sandwich_norms = True
    scales_embedding = True
    layer_names = GEMMA3_LAYER_NAMES
    # The multimodal wrapper's text model: "language_model.model.layers..." (transformers
    # 4.49-4.51) or "model.language_model.layers..." (later); its vision tower is not read.
    wrapper_prefixes = (("language_model.", ""), ("model.language_model.", "model."))
