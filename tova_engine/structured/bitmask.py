"""Constrained rows' allowed tokens, computed on the host by their matchers into one bit per
token (int32 words, llguidance's layout), copied to the logits' device and applied there to
those rows alone: the rest of the batch is untouched, and a CUDA graph's logits are masked
after its replay."""

from __future__ import annotations

import torch

from tova_engine.transfer import to_device


def mask_rows(x: torch.Tensor, rows: list[int], matchers: list) -> None:
    """x [B, V] float logits, in place: rows[i] keeps only the tokens matchers[i] allows."""
    vocab = x.shape[1]
    words = (vocab + 31) // 32
    bits = torch.empty(len(rows), words, dtype=torch.int32, pin_memory=x.is_cuda)
    for i, matcher in enumerate(matchers):
        row = bits[i]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    bits = bits.to(x.device, non_blocking=True)
    token = torch.arange(vocab, device=x.device)
    allowed = (bits[:, token >> 5] >> (token & 31).to(torch.int32)) & 1  # [R, V]
    index = to_device(rows, torch.int64, x.device)
    picked = x.index_select(0, index)
    x.index_copy_(0, index, picked.masked_fill_(allowed == 0, float("-inf")))
