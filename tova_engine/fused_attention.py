"""Decode attention on CUDA through the fused Triton kernels.

Same contract as `state_attention.DecodeAttention` (the CPU path and the reference), but every
tensor is derived on the device from a `slots` tensor: no host data, no host sync, so a CUDA
graph can capture it. Attention spans the whole buffer width; the kernel stops at each row's
own entry count, so the width costs nothing. Under tensor parallelism the kernels all-reduce
the per-entry attention sums of this rank's heads (`KVState.tp`) before they choose.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tova_engine.attention_backend import AttentionBackend
from tova_engine.policies import SLIDING_LAYER_POLICY, Policy
from tova_engine.state import KVState


class _Rows(NamedTuple):
    """What the kernel reads for layers of one kind."""

    entries: torch.Tensor  # [B] valid entries before this token
    capacity: torch.Tensor  # [B]
    recent: torch.Tensor  # [rows] latest positions protected, read by slot
    score_code: int
    protect_first: int


def check_kernel_runs(policy: Policy) -> None:
    """The kernel implements a policy's declaration (policies.py); a subclass that scores
    in its own way cannot run there."""
    if type(policy).scores is not Policy.scores:
        raise ValueError(
            f"policy {policy.name!r} overrides Policy.scores, which the Triton kernel cannot "
            "run: declare it with score / protect_first / protect_recent, or use "
            "kernels='torch'"
        )


class FusedDecodeAttention(AttentionBackend):
    """One new token for each of B rows; `slots` [B] int64 on the state's device."""

    def __init__(
        self,
        state: KVState,
        policy: Policy,
        slots: torch.Tensor,
        ages: torch.Tensor | None = None,
    ) -> None:
        """ages: [layers, B] int64 to write the evicted ages into (a graph's static output);
        allocated when None."""
        from tova_engine.kernels import decode_attention as kernels

        self.kernels = kernels
        self.state = state
        self.uses_attention = policy.uses_attention
        self.slots = slots
        self.entries = state.num_entries[slots]  # [B] valid entries before this token
        self.newest = state.num_seen[slots]  # [B] position of this token
        self.capacity = state.capacity[slots]
        codes = kernels.SCORE_CODES
        # Keyed by `state.is_local(layer)`; derived on the device, so graphs capture them.
        self._rows = {
            False: _Rows(self.entries, self.capacity, state.protect_recent,
                         codes[policy.score], policy.protect_first),
        }
        if (size := state.local_size) is not None:
            window = SLIDING_LAYER_POLICY
            self._rows[True] = _Rows(
                torch.clamp(self.entries, max=size), torch.clamp(self.capacity, max=size),
                state.no_protection, codes[window.score], window.protect_first,
            )
        batch = slots.shape[0]
        if ages is None:
            ages = torch.empty(state.num_layers, batch, dtype=torch.int64, device=slots.device)
        # [layers, B]: tokens back from the newest that each row's evicted entry was; -1 = none.
        self._ages = ages
        self.scratch = None  # sized by the first layer's query heads

    @property
    def positions(self) -> torch.Tensor:
        return self.newest

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        state = self.state
        rows = self._rows[state.is_local(layer)]
        if self.scratch is None:
            batch, heads, head_dim = q.shape
            self.scratch = self.kernels.allocate_scratch(
                batch,
                heads,
                k.shape[1],
                head_dim,
                state.state_size + 1,
                self.uses_attention,
                q.device,
                sharded_heads=state.tp.enabled,
            )
        return self.kernels.decode_attention(
            q.contiguous(),
            k,
            v,
            state.k[layer],
            state.v[layer],
            state.positions[layer],
            None if state.stats is None else state.stats[layer],
            self.slots,
            rows.entries,
            rows.capacity,
            self.newest,
            rows.recent,
            self._ages[layer],
            self.scratch,
            rows.score_code,
            rows.protect_first,
            total_heads=state.total_heads,
            all_reduce=state.tp.all_reduce,
            scale=state.attention_scalar**-0.5,
        )

    def finish(self) -> None:
        """Advance the counters once all layers have run."""
        state = self.state
        state.num_entries[self.slots] = torch.minimum(self.entries + 1, self.capacity)
        state.num_seen[self.slots] = self.newest + 1

    @property
    def evicted_ages(self) -> torch.Tensor:
        """[layers, B] (the graph's static buffer when one was given)."""
        return self._ages
