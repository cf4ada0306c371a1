"""Fused RMSNorm (+ residual add), RoPE and SwiGLU in Triton, one launch each instead of the
five to ten small kernels PyTorch runs for them. Every intermediate is rounded to the model
dtype where PyTorch's version rounds it, so the results match the PyTorch path (model/llama.py)
to the last bit but for the order of the norm's sum."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, stride_o, stride_s, cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
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
    normed = (wide * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = normed * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, hidden] -> norm(x); with a residual, (norm(x + residual), x + residual)."""
    rows, cols = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    summed = torch.empty_like(x) if residual is not None else x
    res = residual if residual is not None else x
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x, res, weight, out, summed,
        x.stride(0), res.stride(0), out.stride(0), summed.stride(0), cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out if residual is None else (out, summed)


@triton.jit
def _rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
    stride_t, stride_c, stride_qt, stride_kt,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
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
    # x1*cos - x2*sin, x2*cos + x1*sin, each product rounded as PyTorch's elementwise ops do.
    out1 = ((a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)).to(dtype)
    if head < NUM_HEADS:
        dst = q_ptr + token * stride_qt + head * 2 * HALF
    else:
        dst = k_ptr + token * stride_kt + (head - NUM_HEADS) * 2 * HALF
    tl.store(dst + offs, out1, mask=mask)
    tl.store(dst + HALF + offs, out2, mask=mask)


def rope(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (H + 2 Hkv) * D] (q, k, v heads side by side), cos/sin [T, D/2] ->
    rotated q [T, H, D] and k [T, Hkv, D]."""
    tokens = qkv.shape[0]
    half = cos.shape[-1]
    q = torch.empty(tokens, num_heads, 2 * half, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, kv_heads, 2 * half, dtype=qkv.dtype, device=qkv.device)
    _rope_kernel[(tokens, num_heads + kv_heads)](
        qkv, cos, sin, q, k, qkv.stride(0), cos.stride(0), q.stride(0), k.stride(0),
        NUM_HEADS=num_heads, HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1,
    )  # fmt: skip
    return q, k


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_g, stride_o, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    gate = tl.load(gate_up_ptr + row * stride_g + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_g + cols + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] -> silu(gate) * up [T, I]."""
    rows, width = gate_up.shape
    cols = width // 2
    out = torch.empty(rows, cols, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(cols))
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), cols, BLOCK=block, num_warps=4
    )
    return out
