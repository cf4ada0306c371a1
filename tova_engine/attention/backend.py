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

Backends: `pytorch.DecodeAttention` (one token per row, PyTorch: the CPU path and the
reference), `pytorch.ChunkAttention` (prefill chunks, PyTorch/SDPA), and
`fused.FusedDecodeAttention` (one token per row, the Triton kernels; no host data, so CUDA
graphs capture it). The two decode backends share `DecodeRows`: the rows' counters, how each
layer kind sees them, and the counters' advance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import SLIDING_LAYER_POLICY, Policy


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


class LayerKind(NamedTuple):
    """What evicts in the layers of one kind: the global layers run the engine's policy with
    each slot's recency protection; sliding-window layers keep their window's latest entries."""

    policy: Policy
    recent: torch.Tensor  # [slots] latest positions protected, read by slot


def layer_kinds(state: KVState, policy: Policy) -> dict[bool, LayerKind]:
    """Keyed by `state.is_local(layer)`; the local kind only where the model has local layers."""
    kinds = {False: LayerKind(policy, state.protect_recent)}
    if state.local_size is not None:
        kinds[True] = LayerKind(SLIDING_LAYER_POLICY, state.no_protection)
    return kinds


class KindRows(NamedTuple):
    """A decode step's rows as the layers of one kind see them."""

    entries: torch.Tensor  # [B] valid entries before this token (the new token's index)
    capacity: torch.Tensor  # [B]
    kind: LayerKind


class DecodeRows(AttentionBackend):
    """One new token for each of B rows: what both decode backends read from the state's
    counters before the step and advance after it. `slots` [B] int64 on the state's device."""

    def __init__(self, state: KVState, policy: Policy, slots: torch.Tensor) -> None:
        self.state = state
        self.slots = slots
        self.entries = state.num_entries[slots]  # [B] valid entries before this token
        self.newest = state.num_seen[slots]  # [B] position of this token
        self.capacity = state.capacity[slots]
        size = state.local_size
        # Keyed by `state.is_local(layer)`: every local layer has the one window's size.
        # Derived on the device, so CUDA graphs capture them.
        self.kinds = {
            local: KindRows(
                torch.clamp(self.entries, max=size) if local else self.entries,
                torch.clamp(self.capacity, max=size) if local else self.capacity,
                kind,
            )
            for local, kind in layer_kinds(state, policy).items()
        }

    @property
    def positions(self) -> torch.Tensor:
        return self.newest

    def finish(self) -> None:
        """Advance the counters once all layers have run."""
        state = self.state
        state.num_entries[self.slots] = torch.minimum(self.entries + 1, self.capacity)
        state.num_seen[self.slots] = self.newest + 1
