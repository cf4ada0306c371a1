"""Fused RMSNorm (+ residual add), RoPE (with the per-head q/k norms before it) and the gated
MLP activation in Triton, one launch each instead of the five to ten small kernels PyTorch runs
for them. Every intermediate is rounded to the model dtype where PyTorch's version rounds it, so
the results match the PyTorch path (model/llama.py, model/gemma3.py) to the last bit but for the
order of the norm's sum (and tanh's formula in gelu).

Two norm styles: Llama's rounds the normalised activations to the model dtype and multiplies by
the weight; Gemma's (`unit_offset`) multiplies by (1 + weight) in float32 and rounds last."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, stride_o, stride_s, cols, eps,
    HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    wide = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(wide * wide, axis=0) / cols + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = _scale(wide * rstd, weight, x.dtype, UNIT_OFFSET)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale(normed, weight, dtype, UNIT_OFFSET: tl.constexpr):
    """The norm's weight applied to float32 normalised values, as the PyTorch norm does it."""
    if UNIT_OFFSET:  # Gemma: x / rms(x) * (1 + w), all in float32
        return normed * (1.0 + weight.to(tl.float32))
    return normed.to(dtype).to(tl.float32) * weight.to(tl.float32)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, hidden] -> norm(x); with a residual, (norm(x + residual), x + residual).
    unit_offset: Gemma's norm, scaled by (1 + weight), its output in x's dtype."""
    rows, cols = x.shape
    out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(x) if residual is not None else x
    res = residual if residual is not None else x
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x, res, weight, out, summed,
        x.stride(0), res.stride(0), out.stride(0), summed.stride(0), cols, eps,
        HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out if residual is None else (out, summed)


@triton.jit
def _rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, q_norm_ptr, k_norm_ptr,
    stride_t, stride_c, stride_qt, stride_kt, eps,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    HAS_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    head = tl.program_id(1)  # query heads first, then key heads
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    src = qkv_ptr + token * stride_t + head * 2 * HALF
    x1 = tl.load(src + offs, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
    cos = tl.load(cos_ptr + token * stride_c + offs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_c + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        # Qwen3 / Gemma 3: the head's RMSNorm (both halves are the whole head), rounded to the
        # model dtype as the PyTorch norm's output is, then rotated.
        rstd = tl.rsqrt((tl.sum(a1 * a1, axis=0) + tl.sum(a2 * a2, axis=0)) / (2 * HALF) + eps)
        if head < NUM_HEADS:  # noqa: SIM108 (a runtime branch; Triton's ternary wants constexpr)
            norm_ptr = q_norm_ptr
        else:
            norm_ptr = k_norm_ptr
        w1 = tl.load(norm_ptr + offs, mask=mask, other=0.0)
        w2 = tl.load(norm_ptr + HALF + offs, mask=mask, other=0.0)
        a1 = _scale(a1 * rstd, w1, dtype, UNIT_OFFSET).to(dtype).to(tl.float32)
        a2 = _scale(a2 * rstd, w2, dtype, UNIT_OFFSET).to(dtype).to(tl.float32)
    # x1*cos - x2*sin, x2*cos + x1*sin, each product rounded as PyTorch's elementwise ops do.
    out1 = ((a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)).to(dtype)
    if head < NUM_HEADS:
        dst = q_ptr + token * stride_qt + head * 2 * HALF
    else:
        dst = k_ptr + token * stride_kt + (head - NUM_HEADS) * 2 * HALF
    tl.store(dst + offs, out1, mask=mask)
    tl.store(dst + HALF + offs, out2, mask=mask)


@dataclass(frozen=True)
class HeadNorms:
    """Per-head RMSNorms of queries and keys, applied before RoPE (Qwen3, Gemma 3)."""

    q_weight: torch.Tensor  # [head_dim]
    k_weight: torch.Tensor  # [head_dim]
    eps: float
    unit_offset: bool  # Gemma's (1 + weight) norm


def rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    norms: HeadNorms | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (H + 2 Hkv) * D] (q, k, v heads side by side), cos/sin [T, D/2] ->
    rotated q [T, H, D] and k [T, Hkv, D], each head normalised first when `norms` are given."""
    tokens = qkv.shape[0]
    half = cos.shape[-1]
    q = torch.empty(tokens, num_heads, 2 * half, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, kv_heads, 2 * half, dtype=qkv.dtype, device=qkv.device)
    q_norm = norms.q_weight if norms is not None else qkv  # unread without norms
    k_norm = norms.k_weight if norms is not None else qkv
    _rope_kernel[(tokens, num_heads + kv_heads)](
        qkv, cos, sin, q, k, q_norm, k_norm,
        qkv.stride(0), cos.stride(0), q.stride(0), k.stride(0),
        norms.eps if norms is not None else 0.0,
        NUM_HEADS=num_heads, HALF=half, BLOCK=triton.next_power_of_2(half),
        HAS_NORM=norms is not None, UNIT_OFFSET=norms is not None and norms.unit_offset,
        num_warps=1,
    )  # fmt: skip
    return q, k


# The gated MLP's activations, by the name the model declares (model/llama.py ACTIVATIONS).
GATED_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _gated_kernel(
    gate_up_ptr, out_ptr, stride_g, stride_o, cols,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    gate = tl.load(gate_up_ptr + row * stride_g + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_g + cols + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if ACTIVATION == 0:  # silu
        act = g / (1.0 + tl.exp(-g))
    else:  # gelu, tanh approximation; tanh(u) = 1 - 2 / (1 + e^2u) saturates cleanly
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))
    act = act.to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate_up [T, 2 I] -> act(gate) * up [T, I]; activation: a GATED_ACTIVATIONS name."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: the kernel has {sorted(GATED_ACTIVATIONS)}")
    rows, width = gate_up.shape
    cols = width // 2
    out = torch.empty(rows, cols, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(cols))
    _gated_kernel[(rows, triton.cdiv(cols, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), cols,
        ACTIVATION=GATED_ACTIVATIONS[activation], BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out
