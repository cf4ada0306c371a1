"""The interface every attention backend over the bounded state implements.

A backend is built by the runner for one model forward over some rows (sequences' slots),
called once per layer by the model, then finished once:

  positions     [T] int64: the absolute position of each of the forward's T input tokens
                (row after row), for RoPE.
  __call__(layer, q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, H, D]
                writes the tokens' keys and values into the state (keys already rotated),
                attends over each row's valid entries and its own new tokens, and applies
                the eviction policy (`policies.Policy`, the same declaration on every
                backend) so that no row holds more than its capacity.
  finish()      advances the rows' counters (`num_entries`, `num_seen`) once every layer
                has run.
  evicted_ages  after finish: an int64 tensor [layers, rows, E], how many tokens back from
                the newest each evicted entry was, -1 where nothing was evicted; None when
                no layer evicted (E is 1 for one token per row, the chunk's candidates for
                a chunk).

Backends: `state_attention.DecodeAttention` (one token per row, PyTorch: the CPU path and the
reference), `state_attention.ChunkAttention` (prefill chunks, PyTorch/SDPA), and
`fused_attention.FusedDecodeAttention` (one token per row, the Triton kernels; no host data,
so CUDA graphs capture it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionBackend(ABC):
    @property
    @abstractmethod
    def positions(self) -> torch.Tensor: ...

    @abstractmethod
    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...

    @abstractmethod
    def finish(self) -> None: ...

    @property
    @abstractmethod
    def evicted_ages(self) -> torch.Tensor | None: ...
