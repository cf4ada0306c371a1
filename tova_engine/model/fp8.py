"""FP8 weights (`quantization="fp8"`): the projections' weights in float8 e4m3 with one scale
per output channel, the activations quantized per token as they arrive.

Per channel and per token (vLLM's "fp8 dynamic" scheme): a weight row's largest magnitude
maps to e4m3's largest finite value (448), so no row's range is wasted on another's outliers,
and a token's activations get a scale of their own each step (no calibration, nothing to
load). On CUDA with FP8 matmuls (compute capability 8.9+: Ada, Hopper) the product is
`torch._scaled_mm` on the 8-bit operands, both scales applied to its float32 accumulator;
elsewhere (CPU, where CI runs it) the same e4m3 operands are dequantized and multiplied in
float32 (`emulated`), the reference the scaled matmul is checked against.

Quantized: the four projections of every layer (q/k/v, o, gate/up, down), where the weights'
bytes and FLOPs are. Not quantized: the embedding, the LM head and the norms (as vLLM and
the published FP8 checkpoints leave them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
QUANTIZATIONS = ("fp8",)
# The projections that hold FP8 weights, by attribute name on their module.
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_MIN_SCALE = 1e-12  # an all-zero vector: any scale gives zeros; avoid 0 / 0


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (e4m3 [..., D], float32 scales [...]): each vector along the last dimension
    scaled so that its largest magnitude becomes 448. The one quantizer of FP8 weights' rows,
    activations' tokens and the float8 state's head vectors (state/fp8_buffer.py)."""
    wide = x.float()
    scale = (wide.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (wide / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] high precision -> (e4m3 [out, in], float32 scales [out]) with row r
    ~= q[r] * scale[r]."""
    return quantize_vectors(weight)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, in] activations -> (e4m3 [T, in], float32 scales [T, 1]), one scale per token."""
    quantized, scale = quantize_vectors(x)
    return quantized, scale[:, None]


def dequantize_rows(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """The weight the FP8 rows stand for, in `dtype`."""
    return (quantized.float() * scale.float()[:, None]).to(dtype)


def fp8_matmul_problem(device: torch.device) -> str | None:
    """Why FP8 weights cannot run on `device`, or None when they can (CUDA 8.9+ with scaled
    matmuls; CPU, emulated)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"{name} (compute capability {major}.{minor}) has no FP8 matmuls; they need "
                "8.9 or later (Ada, Hopper, Blackwell)")
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm"
    return None


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W held as e4m3 rows and a float32 scale per row."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        """bias: the replaced layer's (kept in the activations' dtype) or None."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32),
                                         requires_grad=False)
        self.bias = bias

    @classmethod
    def replacing(cls, linear: nn.Linear) -> Fp8Linear:
        """An FP8 layer of the same shape (on the same device: meta while a model is built)."""
        with torch.device(linear.weight.device):
            return cls(linear.in_features, linear.out_features, linear.bias)

    @torch.no_grad()
    def load_rows(self, offset: int, weight: torch.Tensor) -> bool:
        """Fill rows [offset, offset + len(weight)): high-precision rows are quantized here,
        row by row, scales included; e4m3 rows are taken as they are and their scales must
        follow (`load_scales`). Returns whether they must."""
        rows = slice(offset, offset + weight.shape[0])
        if weight.dtype == FP8:
            self.weight[rows].copy_(weight)
            return True
        quantized, scale = quantize_rows(weight)
        self.weight[rows].copy_(quantized)
        self.weight_scale[rows].copy_(scale)
        return False

    @torch.no_grad()
    def load_scales(self, offset: int, scale: torch.Tensor) -> None:
        """The float32 scales of e4m3 rows [offset, offset + len(scale))."""
        self.weight_scale[offset : offset + scale.numel()].copy_(scale.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self._scaled_mm(x)
        return self.emulated(x)

    def emulated(self, x: torch.Tensor) -> torch.Tensor:
        """What the scaled matmul computes, in float32 ops: the same e4m3 operands (the
        activations quantized per token too), products summed in float32, both scales."""
        flat = x.reshape(-1, self.in_features)
        quantized, token_scale = quantize_tokens(flat)
        weight = dequantize_rows(self.weight, self.weight_scale, torch.float32)
        out = F.linear(quantized.float() * token_scale, weight).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        quantized, token_scale = quantize_tokens(flat)
        # Row-wise scales give bfloat16 only; other dtypes are cast from it.
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=token_scale,
            scale_b=self.weight_scale.view(1, -1), out_dtype=torch.bfloat16,
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn per channel")


def use_fp8_linears(model: nn.Module) -> int:
    """Replace every quantized projection (`QUANTIZED_LINEARS`) with an `Fp8Linear` of its
    shape; returns how many. Call on the model built on the meta device, before its memory
    is allocated, so that no high-precision copy of these weights is ever made."""
    count = 0
    for module in list(model.modules()):
        for name in QUANTIZED_LINEARS:
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear):
                setattr(module, name, Fp8Linear.replacing(linear))
                count += 1
    return count
