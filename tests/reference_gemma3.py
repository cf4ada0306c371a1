"""The slow reference decoder (reference_tova.py) with Gemma 3's model pieces, written from
transformers' modeling_gemma3.py: (1 + weight) norms, four norms per layer, the scaled
embedding, gelu(tanh) gating, and RoPE per layer kind (the local base on sliding layers, the
global base and linear scaling on full ones). The bounded state is the base class's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tests.reference_tova import ReferenceDecoder


@dataclass
class Gemma3ReferenceDecoder(ReferenceDecoder):
    hidden_size: int = 0
    rope_local_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # global layers' linear RoPE scaling

    def rmsnorm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return (1.0 + self.w(name)) * x / torch.sqrt((x * x).mean() + self.eps)

    def embed(self, token: int) -> torch.Tensor:
        # sqrt(hidden) as transformers holds it: a float32 buffer cast to the weights' dtype.
        scale = torch.tensor(self.hidden_size**0.5, dtype=torch.float32).double()
        return super().embed(token) * scale

    def frequency(self, i: int, layer: int) -> torch.Tensor:
        exponent = torch.tensor(2 * i, dtype=torch.float32) / self.head_dim
        if self.is_local(layer):
            return 1.0 / (self.rope_local_theta**exponent)
        return 1.0 / (self.rope_theta**exponent) / self.rope_linear_factor

    def finish_layer(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}."
        attended = self.w(p + "self_attn.o_proj.weight") @ attn_out
        x = x + self.rmsnorm(attended, p + "post_attention_layernorm.weight")
        h = self.rmsnorm(x, p + "pre_feedforward_layernorm.weight")
        gate = F.gelu(self.w(p + "mlp.gate_proj.weight") @ h, approximate="tanh")
        mlp = self.w(p + "mlp.down_proj.weight") @ (gate * (self.w(p + "mlp.up_proj.weight") @ h))
        return x + self.rmsnorm(mlp, p + "post_feedforward_layernorm.weight")
