"""Decode attention, policy scoring and eviction over the bounded state, fused in Triton.

Two launches per layer, for B rows that each feed one new token:
  1. `_attend_kernel`, grid (B, kv_heads, splits): one program reads one split of one row's
     valid entries for one kv head in place, by slot index (no gathered copy of K/V), for
     the G query heads that share it: online softmax, a partial output, and the scaled
     logit of every entry it saw. Split 0 also takes the new token, from registers.
  2. `_evict_kernel`, grid (B,): merges the splits into the output, averages the attention
     probabilities over all H query heads, scores the entries with the policy, takes the
     lowest, and writes the new token's K/V/position (and H2O statistic) there.
Under tensor parallelism a rank holds some of the heads, and every rank must evict the same
entry, so step 2 splits in three: `_merge_kernel` writes the output and each entry's attention
summed over the rank's heads, the caller all-reduces those sums ([B, S+1] float32, inside a
CUDA graph too), and `_evict_kernel` scores from them.
The new token is never written to the spare entry first: when the row is not full its
target is index `num_entries`, which is that entry anyway.

A float8 state (`kv_cache_dtype="fp8"`) is read as e4m3 values with a float32 scale per head
vector, folded into each entry's logit (K) and probability (V); the new token is attended as
computed and stored as the caller quantized it (`Fp8Step`: the PyTorch path's own function,
so both store the same bits).

`attention.pytorch.DecodeAttention` is the reference these kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# What scores an entry (policies.py's declaration), selected at compile time; the protected
# first positions are a compile-time constant, the protected latest ones each row's own.
SCORE_CODES = {"attention": 0, "accumulated": 1, "position": 2}
_ATTENTION, _ACCUMULATED = tl.constexpr(0), tl.constexpr(1)  # for kernels
# Launch settings of the attention kernel: entries per loop iteration, warps, pipeline stages
# (benchmarks/attention_kernel.py sweeps them).
TUNING = {"block_n": 64, "num_warps": 4, "num_stages": 3}


@triton.jit
def _attend_kernel(
    q_ptr, k_new_ptr, v_new_ptr, k_buf_ptr, v_buf_ptr, k_scale_ptr, v_scale_ptr,
    slots_ptr, entries_ptr,
    logits_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh,
    stride_kr, stride_kh, stride_ke, stride_vr, stride_vh, stride_ve,
    stride_ksr, stride_ksh, stride_vsr, stride_vsh,
    stride_lb, stride_lh,
    split_len, scale,
    NUM_HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    STORE_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    slot = tl.load(slots_ptr + b)
    n = tl.load(entries_ptr + b)  # valid entries before this token
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = kv_head * G + offs_g  # [BG] query heads sharing this kv head
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BG, BD]
    k_new = tl.load(k_new_ptr + b * stride_knb + kv_head * stride_knh + offs_d, mask=d_mask)
    v_new = tl.load(v_new_ptr + b * stride_vnb + kv_head * stride_vnh + offs_d, mask=d_mask)
    # The new token starts split 0's softmax: m = its logit, l = 1, acc = its value.
    first = split == 0
    logit_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # [BG]
    m_i = tl.where(first, logit_new, float("-inf"))
    l_i = tl.zeros([BLOCK_G], tl.float32) + tl.where(first, 1.0, 0.0)
    acc = (
        tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        + tl.where(first, v_new.to(tl.float32), 0.0)[None, :]
    )
    logit_row = logits_ptr + b * stride_lb + heads * stride_lh  # [BG]
    if STORE_LOGITS:
        # (a block-shaped mask: Triton's CPU interpreter refuses a block & scalar one)
        tl.store(logit_row + n, logit_new, mask=g_mask & (offs_g * 0 + split == 0))
    k_row = k_buf_ptr + slot * stride_kr + kv_head * stride_kh
    v_row = v_buf_ptr + slot * stride_vr + kv_head * stride_vh
    k_scale_row = k_scale_ptr + slot * stride_ksr + kv_head * stride_ksh  # (FP8 only)
    v_scale_row = v_scale_ptr + slot * stride_vsr + kv_head * stride_vsh
    lo = split.to(tl.int64) * split_len
    hi = tl.minimum(lo + split_len, n)
    # Every block holds at least one valid entry (start < hi), so m stays finite.
    for start in range(lo, hi, BLOCK_N):
        e = start + offs_n
        e_mask = e < hi
        kv_mask = e_mask[:, None] & d_mask[None, :]
        k = tl.load(k_row + e[:, None] * stride_ke + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP8:  # float8 entries times their head vector's scale, folded into the logit's
            k_scale = tl.load(k_scale_row + e, mask=e_mask, other=0.0)  # [BN]
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
            s = s * (k_scale * scale)[None, :]  # [BG, BN] fp32
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BG, BN] fp32
        s = tl.where(e_mask[None, :], s, float("-inf"))
        if STORE_LOGITS:
            tl.store(logit_row[:, None] + e[None, :], s, mask=g_mask[:, None] & e_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_row + e[:, None] * stride_ve + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP8:  # each entry's value scale folded into its probability
            v_scale = tl.load(v_scale_row + e, mask=e_mask, other=0.0)
            weighted = (p * v_scale[None, :]).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(weighted, v.to(q.dtype),
                                                input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    part = (b * NUM_HEADS + heads) * num_splits + split  # [BG] index into [B, H, splits]
    tl.store(m_ptr + part, m_i, mask=g_mask)
    tl.store(l_ptr + part, l_i, mask=g_mask)
    acc_mask = g_mask[:, None] & d_mask[None, :]
    tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=acc_mask)


@triton.jit
def _merge_splits(
    out_ptr, m_ptr, l_ptr, acc_ptr, b, stride_ob, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row b's splits merged: writes the attention output, returns each head's global max
    and softmax sum ([BH] each)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < NUM_HEADS
    hd_mask = h_mask[:, None] & (offs_d < D)[None, :]
    part = (b * NUM_HEADS + offs_h) * num_splits  # [BH]
    m_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + part + s, mask=h_mask, other=float("-inf")))
    m_max = tl.where(h_mask, m_max, 0.0)  # padding heads: keep exp() finite
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s in range(num_splits):
        weight = tl.exp(tl.load(m_ptr + part + s, mask=h_mask, other=float("-inf")) - m_max)
        l_sum += tl.load(l_ptr + part + s, mask=h_mask, other=0.0) * weight
        partial_ptrs = acc_ptr + (part + s)[:, None] * D + offs_d[None, :]
        acc += tl.load(partial_ptrs, mask=hd_mask, other=0.0) * weight[:, None]
    l_sum = tl.where(h_mask, l_sum, 1.0)
    out = acc / l_sum[:, None]
    out_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=hd_mask)
    return m_max, l_sum


@triton.jit
def _head_summed_probs(logit_rows, e, valid, m_max, l_sum, h_mask):
    """Attention probabilities of entries `e` summed over this launch's query heads: [BE]."""
    logits = tl.load(
        logit_rows + e[None, :], mask=h_mask[:, None] & valid[None, :], other=float("-inf")
    )
    probs = tl.exp(logits - m_max[:, None]) / l_sum[:, None]
    return tl.sum(tl.where(h_mask[:, None], probs, 0.0), axis=0)


@triton.jit
def _merge_kernel(
    out_ptr, m_ptr, l_ptr, acc_ptr, logits_ptr, sums_ptr, entries_ptr,
    stride_ob, stride_oh, stride_lb, stride_lh, stride_sb,
    num_splits,
    NUM_HEADS: tl.constexpr, D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Tensor parallelism, grid (B,): the output, and each entry's probabilities summed over
    this rank's heads into `sums` [B, S+1], to be all-reduced before `_evict_kernel` scores."""
    b = tl.program_id(0)
    n = tl.load(entries_ptr + b)
    m_max, l_sum = _merge_splits(
        out_ptr, m_ptr, l_ptr, acc_ptr, b, stride_ob, stride_oh, num_splits,
        NUM_HEADS, D, BLOCK_H, BLOCK_D,
    )  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    logit_rows = logits_ptr + b * stride_lb + offs_h[:, None] * stride_lh  # [BH, 1]
    for start in range(0, n + 1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        valid = e <= n
        summed = _head_summed_probs(logit_rows, e, valid, m_max, l_sum, offs_h < NUM_HEADS)
        tl.store(sums_ptr + b * stride_sb + e, summed, mask=valid)


@triton.jit
def _evict_kernel(
    out_ptr, m_ptr, l_ptr, acc_ptr, logits_ptr, sums_ptr,
    k_new_ptr, v_new_ptr, k_buf_ptr, v_buf_ptr, k_scale_ptr, v_scale_ptr,
    k_new_scale_ptr, v_new_scale_ptr,
    positions_ptr, stats_ptr,
    slots_ptr, entries_ptr, capacity_ptr, newest_ptr, recent_ptr, ages_ptr,
    stride_ob, stride_oh, stride_lb, stride_lh, stride_sb,
    stride_knb, stride_knh, stride_vnb, stride_vnh,
    stride_kr, stride_kh, stride_ke, stride_vr, stride_vh, stride_ve,
    stride_ksr, stride_ksh, stride_vsr, stride_vsh, stride_ksnb, stride_vsnb,
    stride_pr, stride_sr,
    num_splits,
    NUM_HEADS: tl.constexpr, TOTAL_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
    SCORE: tl.constexpr, USES_ATTENTION: tl.constexpr, SUMS_IN: tl.constexpr,
    PROTECT_FIRST: tl.constexpr, FP8: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """SUMS_IN: the output is written and the per-entry head sums come all-reduced in `sums`
    (tensor parallelism, after `_merge_kernel`); else this kernel merges and sums itself."""
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b)
    n = tl.load(entries_ptr + b)
    capacity = tl.load(capacity_ptr + b)
    newest = tl.load(newest_ptr + b)
    recent = tl.load(recent_ptr + slot)  # the latest positions this row never evicts
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < NUM_HEADS
    d_mask = offs_d < D

    # 1. Merge the splits: global max and sum per head, then the output.
    if not SUMS_IN:
        m_max, l_sum = _merge_splits(
            out_ptr, m_ptr, l_ptr, acc_ptr, b, stride_ob, stride_oh, num_splits,
            NUM_HEADS, D, BLOCK_H, BLOCK_D,
        )  # fmt: skip

    # 2. Score the valid entries plus the new one (index n); keep the first minimum.
    positions_row = positions_ptr + slot * stride_pr
    stats_row = stats_ptr + slot * stride_sr
    logit_rows = logits_ptr + b * stride_lb + offs_h[:, None] * stride_lh  # [BH, 1]
    best = tl.full([], float("inf"), tl.float32)
    best_index = tl.full([], 0, tl.int64)
    new_stat = tl.full([], 0.0, tl.float32)
    for start in range(0, n + 1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        valid = e <= n
        old = e < n
        pos = tl.load(positions_row + e, mask=old, other=0)
        pos = tl.where(e == n, newest, pos)
        if USES_ATTENTION:
            if SUMS_IN:
                summed = tl.load(sums_ptr + b * stride_sb + e, mask=valid, other=0.0)
            else:
                summed = _head_summed_probs(logit_rows, e, valid, m_max, l_sum, h_mask)
            attn = summed / TOTAL_HEADS  # [BE]
        if SCORE == _ATTENTION:
            score = attn
        elif SCORE == _ACCUMULATED:
            stat = tl.load(stats_row + e, mask=old, other=0.0) + attn
            tl.store(stats_row + e, stat, mask=valid)
            new_stat += tl.sum(tl.where(e == n, stat, 0.0), axis=0)
            score = stat
        else:
            score = pos.to(tl.float32)
        protected = pos > newest - recent
        if PROTECT_FIRST > 0:
            protected = protected | (pos < PROTECT_FIRST)
        score = tl.where(protected, float("inf"), score)
        score = tl.where(valid, score, float("inf"))
        block_min = tl.min(score, axis=0)
        block_index = tl.argmin(score, axis=0).to(tl.int64) + start
        better = block_min < best
        best_index = tl.where(better, block_index, best_index)
        best = tl.where(better, block_min, best)

    # 3. Move the new token onto the target (the spare entry n when the row is not full).
    full = n >= capacity
    target = tl.where(full, best_index, n)
    held = tl.load(positions_row + target, mask=target < n, other=0)
    held = tl.where(target == n, newest, held)
    tl.store(ages_ptr + b, tl.where(full, newest - held, -1))
    offs_kv = tl.arange(0, BLOCK_KV)
    kv_mask = offs_kv < KV_HEADS
    kvd_mask = kv_mask[:, None] & d_mask[None, :]
    k_new = tl.load(
        k_new_ptr + b * stride_knb + offs_kv[:, None] * stride_knh + offs_d[None, :],
        mask=kvd_mask, other=0.0,
    )
    v_new = tl.load(
        v_new_ptr + b * stride_vnb + offs_kv[:, None] * stride_vnh + offs_d[None, :],
        mask=kvd_mask, other=0.0,
    )
    k_dst = k_buf_ptr + slot * stride_kr + offs_kv[:, None] * stride_kh + target * stride_ke
    v_dst = v_buf_ptr + slot * stride_vr + offs_kv[:, None] * stride_vh + target * stride_ve
    if FP8:  # k_new / v_new are the token quantized already; their scales beside them
        k_scale = tl.load(k_new_scale_ptr + b * stride_ksnb + offs_kv, mask=kv_mask)
        v_scale = tl.load(v_new_scale_ptr + b * stride_vsnb + offs_kv, mask=kv_mask)
        tl.store(k_scale_ptr + slot * stride_ksr + offs_kv * stride_ksh + target, k_scale,
                 mask=kv_mask)
        tl.store(v_scale_ptr + slot * stride_vsr + offs_kv * stride_vsh + target, v_scale,
                 mask=kv_mask)
    tl.store(k_dst + offs_d[None, :], k_new, mask=kvd_mask)
    tl.store(v_dst + offs_d[None, :], v_new, mask=kvd_mask)
    tl.store(positions_row + target, newest)
    if SCORE == _ACCUMULATED:
        tl.debug_barrier()  # the block stores above may have written `target` from other threads
        tl.store(stats_row + target, new_stat)


class Fp8Step(NamedTuple):
    """A float8 state's part of a decode layer: the state's per-vector scales, and the new
    token quantized for storing (the attention reads it as computed)."""

    k_scale: torch.Tensor  # [rows, Hkv, S+1] float32
    v_scale: torch.Tensor
    k_new: torch.Tensor  # [B, Hkv, D] float8 e4m3
    v_new: torch.Tensor
    k_new_scale: torch.Tensor  # [B, Hkv] float32
    v_new_scale: torch.Tensor


class DecodeScratch(NamedTuple):
    """Per-step work buffers, shared by all layers."""

    # [B, H, S+1] float32 scaled logits (a stub when the policy ignores attention)
    logits: torch.Tensor
    row_max: torch.Tensor  # [B, H, splits] float32: each split's running max
    row_sum: torch.Tensor  # [B, H, splits] float32: each split's running sum
    acc: torch.Tensor  # [B, H, splits, D] float32: each split's unnormalised output
    split_len: int  # entries per split, a multiple of the loop's block
    # [B, S+1] float32: per-entry attention summed over the heads, all-reduced across ranks
    # (tensor parallelism with a policy that reads attention; else None)
    sums: torch.Tensor | None = None


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's CPU interpreter (development only)
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(batch: int, kv_heads: int, width: int, device: torch.device) -> tuple[int, int]:
    """(splits, entries per split): enough programs for about four per multiprocessor, so a
    small batch over a long state still uses the whole GPU (flash-decoding)."""
    block_n = TUNING["block_n"]
    blocks = triton.cdiv(width, block_n)
    wanted = triton.cdiv(4 * _num_sms(device), batch * kv_heads)
    splits = max(1, min(wanted, blocks, 64))
    split_len = triton.cdiv(blocks, splits) * block_n
    return triton.cdiv(width, split_len), split_len


def allocate_scratch(
    batch: int,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    width: int,
    needs_attention: bool,
    device: torch.device,
    sharded_heads: bool = False,
) -> DecodeScratch:
    """sharded_heads: the heads are split across tensor-parallel ranks (adds `sums`)."""
    splits, split_len = plan_splits(batch, kv_heads, width, device)
    f32 = dict(dtype=torch.float32, device=device)
    logits_shape = (batch, num_heads, width) if needs_attention else (1, 1, 1)
    sums = torch.zeros(batch, width, **f32) if needs_attention and sharded_heads else None
    return DecodeScratch(
        torch.empty(logits_shape, **f32),
        torch.empty(batch, num_heads, splits, **f32),
        torch.empty(batch, num_heads, splits, **f32),
        torch.empty(batch, num_heads, splits, head_dim, **f32),
        split_len,
        sums,
    )


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    positions: torch.Tensor,
    stats: torch.Tensor | None,
    slots: torch.Tensor,
    entries: torch.Tensor,
    capacity: torch.Tensor,
    newest: torch.Tensor,
    recent: torch.Tensor,
    ages: torch.Tensor,
    scratch: DecodeScratch,
    score: int,
    protect_first: int,
    total_heads: int | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scale: float | None = None,
    fp8: Fp8Step | None = None,
) -> torch.Tensor:
    """One layer's decode step for B rows; updates the state in place.

    q [B, H, D], k_new / v_new [B, Hkv, D] (last dim contiguous); k_buf / v_buf
    [rows, Hkv, S+1, D]; positions / stats [rows, S+1] (this layer's); slots, entries,
    capacity, newest [B] int64; recent [rows] int64 (each slot's protected latest positions,
    read by slot); score: a SCORE_CODES code; ages [B] int64 out (tokens back of the evicted
    entry, -1 when none). Returns the attention output [B, H, D].

    Tensor parallelism: H is this rank's share of `total_heads`; `all_reduce` sums
    `scratch.sums` across ranks in place (needed when the policy reads attention).
    scale: of the attention logits, head_dim ** -0.5 when None.
    fp8: with a float8 state (k_buf and v_buf hold e4m3): its scales and the new token
    quantized for storing; the new token is attended as computed.
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k_new.shape[1]
    group = num_heads // kv_heads
    for t in (q, k_new, v_new, k_buf, v_buf, *((fp8.k_new, fp8.v_new) if fp8 else ())):
        if t.stride(-1) != 1:
            raise ValueError("decode_attention needs the last dimension contiguous")
    out = torch.empty_like(q)
    uses_attention = score != SCORE_CODES["position"]
    splits = scratch.row_max.shape[-1]
    stats_arg = positions if stats is None else stats  # read only for accumulated attention
    block_d = triton.next_power_of_2(head_dim)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Without a float8 state the scale pointers are stubs the kernels never read.
    stub = scratch.row_max
    k_scales, v_scales = (fp8.k_scale, fp8.v_scale) if fp8 else (stub, stub)
    k_new_scales, v_new_scales = (fp8.k_new_scale, fp8.v_new_scale) if fp8 else (stub, stub)
    k_stored, v_stored = (fp8.k_new, fp8.v_new) if fp8 else (k_new, v_new)
    scale_strides = (k_scales.stride(0), k_scales.stride(1), v_scales.stride(0),
                     v_scales.stride(1))
    _attend_kernel[(batch, kv_heads, splits)](
        q, k_new, v_new, k_buf, v_buf, k_scales, v_scales, slots, entries,
        scratch.logits, scratch.row_max, scratch.row_sum, scratch.acc,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1),
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        *scale_strides,
        scratch.logits.stride(0), scratch.logits.stride(1),
        scratch.split_len, head_dim**-0.5 if scale is None else scale,
        NUM_HEADS=num_heads, G=group, D=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=TUNING["block_n"], STORE_LOGITS=uses_attention, DOT_PRECISION=precision,
        FP8=fp8 is not None, num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )  # fmt: skip
    block_h = triton.next_power_of_2(num_heads)
    block_e = max(16, min(256, 4096 // block_h))
    sums_in = uses_attention and scratch.sums is not None
    sums = scratch.sums if sums_in else scratch.row_max.view(batch, -1)  # a stub otherwise
    if sums_in:
        _merge_kernel[(batch,)](
            out, scratch.row_max, scratch.row_sum, scratch.acc, scratch.logits, sums, entries,
            out.stride(0), out.stride(1), scratch.logits.stride(0), scratch.logits.stride(1),
            sums.stride(0),
            splits,
            NUM_HEADS=num_heads, D=head_dim,
            BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_E=block_e,
            num_warps=4,
        )  # fmt: skip
        if all_reduce is None:
            raise ValueError("decode_attention: scratch.sums needs an all_reduce")
        all_reduce(sums)
    _evict_kernel[(batch,)](
        out, scratch.row_max, scratch.row_sum, scratch.acc, scratch.logits, sums,
        k_stored, v_stored, k_buf, v_buf, k_scales, v_scales, k_new_scales, v_new_scales,
        positions, stats_arg,
        slots, entries, capacity, newest, recent, ages,
        out.stride(0), out.stride(1), scratch.logits.stride(0), scratch.logits.stride(1),
        sums.stride(0),
        k_stored.stride(0), k_stored.stride(1), v_stored.stride(0), v_stored.stride(1),
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        *scale_strides, k_new_scales.stride(0), v_new_scales.stride(0),
        positions.stride(0), stats_arg.stride(0),
        splits,
        NUM_HEADS=num_heads, TOTAL_HEADS=total_heads or num_heads, KV_HEADS=kv_heads,
        D=head_dim, SCORE=score, USES_ATTENTION=uses_attention, SUMS_IN=sums_in,
        PROTECT_FIRST=protect_first, FP8=fp8 is not None,
        BLOCK_H=block_h, BLOCK_KV=triton.next_power_of_2(kv_heads), BLOCK_D=block_d,
        BLOCK_E=block_e,
        num_warps=4,
    )  # fmt: skip
    return out
