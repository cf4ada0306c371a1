"""Decode attention on CUDA through the fused Triton kernels.

Same contract as `state_attention.DecodeAttention` (the CPU path and the reference), but every
tensor is derived on the device from a `slots` tensor: no host data, no host sync, so a CUDA
graph can capture it. Attention spans the whole buffer width; the kernel stops at each row's
own entry count, so the width costs nothing. Under tensor parallelism the kernels all-reduce
the per-entry attention sums of this rank's heads (`KVState.tp`) before they choose.
"""

from __future__ import annotations

import torch

from tova_engine.policies import NUM_SINK_TOKENS, POLICIES, Policy
from tova_engine.state import KVState


def fused_policy_supported(policy: Policy) -> bool:
    """The kernel implements the built-in policies only (a subclass may score differently)."""
    return type(policy) is POLICIES.get(policy.name)


class FusedDecodeAttention:
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
        self.policy_code = kernels.POLICY_CODES[policy.name]
        self.slots = slots
        self.entries = state.num_entries[slots]  # [B] valid entries before this token
        self.newest = state.num_seen[slots]  # [B] position of this token
        self.capacity = state.capacity[slots]
        batch = slots.shape[0]
        if ages is None:
            ages = torch.empty(state.num_layers, batch, dtype=torch.int64, device=slots.device)
        # [layers, B]: tokens back from the newest that each row's evicted entry was; -1 = none.
        self.evicted_ages = ages
        self.scratch = None  # sized by the first layer's query heads

    @property
    def positions(self) -> torch.Tensor:
        return self.newest

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        state = self.state
        if self.scratch is None:
            batch, heads, head_dim = q.shape
            self.scratch = self.kernels.allocate_scratch(
                batch,
                heads,
                k.shape[1],
                head_dim,
                state.state_size + 1,
                self.policy_code in (self.kernels.TOVA, self.kernels.H2O),
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
            self.entries,
            self.capacity,
            self.newest,
            self.evicted_ages[layer],
            self.scratch,
            self.policy_code,
            NUM_SINK_TOKENS,
            total_heads=state.total_heads,
            all_reduce=state.tp.all_reduce,
        )

    def finish(self) -> None:
        """Advance the counters once all layers have run."""
        state = self.state
        state.num_entries[self.slots] = torch.minimum(self.entries + 1, self.capacity)
        state.num_seen[self.slots] = self.newest + 1
