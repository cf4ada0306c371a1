"""One layer's K or V in float8 (`kv_cache_dtype="fp8"`): e4m3 values with a float32 scale per
(row, head, entry), the entry's largest magnitude mapped to e4m3's largest finite value.

A scale per head vector rather than per tensor: e4m3 has the range of no activation in
particular, and a vector scaled to its own maximum keeps its 3 mantissa bits of precision
whatever its magnitude (a value-head whose entries are all small would otherwise fall into
e4m3's subnormals). The scales cost 4 bytes per head_dim bytes: 3 % at head_dim 128.

It indexes like the tensor it replaces, `[rows, heads, entries, head_dim]`, with the last
dimension whole: reading gives the entries dequantized to the compute dtype, writing
quantizes each head vector. `copy_rows` moves the stored bytes, so a fork, a cached prefix
and a saved state hold exactly what the slot held.
"""

from __future__ import annotations

import torch

from tova_engine.model.fp8 import FP8, quantize_vectors

__all__ = ["FP8", "Fp8KV", "entry_bytes", "quantize_vectors"]


class Fp8KV:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        """shape: [rows, heads, entries, head_dim]; dtype: what reads return."""
        self.data = torch.zeros(shape, dtype=FP8, device=device)
        self.scale = torch.ones(shape[:-1], dtype=torch.float32, device=device)
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, index) -> torch.Tensor:
        """The indexed entries dequantized to `dtype` (the index never touches head_dim)."""
        values = self.data[index].float() * self.scale[index].unsqueeze(-1)
        return values.to(self.dtype)

    def __setitem__(self, index, value: torch.Tensor) -> None:
        quantized, scale = quantize_vectors(value)
        self.data[index] = quantized
        self.scale[index] = scale

    def copy_rows(self, dst, src) -> None:
        """Row(s) `src` to `dst`, as stored (no requantization)."""
        self.data[dst] = self.data[src]
        self.scale[dst] = self.scale[src]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + \
            self.scale.numel() * self.scale.element_size()


def entry_bytes(head_dim: int, dtype: torch.dtype, fp8: bool) -> int:
    """Bytes one head's K (or V) entry takes."""
    if fp8:
        return head_dim + 4  # e4m3 values and a float32 scale
    return head_dim * torch.empty((), dtype=dtype).element_size()
