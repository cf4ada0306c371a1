"""Decode attention on CUDA through the fused Triton kernels.

Same contract as `pytorch.DecodeAttention` (the CPU path and the reference), but every
tensor is derived on the device from a `slots` tensor: no host data, no host sync, so a CUDA
graph can capture it. Attention spans the whole buffer width; the kernel stops at each row's
own entry count, so the width costs nothing. Under tensor parallelism the kernels all-reduce
the per-entry attention sums of this rank's heads (`KVState.tp`) before they choose.
"""

from __future__ import annotations

import torch

from tova_engine.attention.backend import DecodeRows
from tova_engine.state.fp8_buffer import quantize_vectors
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy


def check_kernel_runs(policy: Policy) -> None:
    """The kernel implements a policy's declaration (policies.py); a subclass that scores
    in its own way cannot run there."""
    if type(policy).scores is not Policy.scores:
        raise ValueError(
            f"policy {policy.name!r} overrides Policy.scores, which the Triton kernel cannot "
            "run: declare it with score / protect_first / protect_recent, or use "
            "kernels='torch'"
        )


class FusedDecodeAttention(DecodeRows):
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

        super().__init__(state, policy, slots)
        self.kernels = kernels
        self.uses_attention = policy.uses_attention
        batch = slots.shape[0]
        if ages is None:
            ages = torch.empty(state.num_layers, batch, dtype=torch.int64, device=slots.device)
        # [layers, B]: tokens back from the newest that each row's evicted entry was; -1 = none.
        self._ages = ages
        self.scratch = None  # sized by the first layer's query heads

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        state = self.state
        rows = self.kinds[state.is_local(layer)]
        policy = rows.kind.policy
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
        k_buf, v_buf, fp8 = state.k[layer], state.v[layer], None
        if state.fp8:  # the float8 values, their scales and the new token quantized
            (k_new, k_new_scale), (v_new, v_new_scale) = quantize_vectors(k), quantize_vectors(v)
            fp8 = self.kernels.Fp8Step(k_buf.scale, v_buf.scale, k_new, v_new, k_new_scale,
                                       v_new_scale)
            k_buf, v_buf = k_buf.data, v_buf.data
        return self.kernels.decode_attention(
            q.contiguous(),
            k,
            v,
            k_buf,
            v_buf,
            state.positions[layer],
            None if state.stats is None else state.stats[layer],
            self.slots,
            rows.entries,
            rows.capacity,
            self.newest,
            rows.kind.recent,
            self._ages[layer],
            self.scratch,
            self.kernels.SCORE_CODES[policy.score],
            policy.protect_first,
            total_heads=state.total_heads,
            all_reduce=state.tp.all_reduce,
            scale=state.attention_scalar**-0.5,
            fp8=fp8,
        )

    @property
    def evicted_ages(self) -> torch.Tensor:
        """[layers, B] (the graph's static buffer when one was given)."""
        return self._ages
