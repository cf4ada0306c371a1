"""The bounded multi-state: per-layer key/value buffers, one row (slot) per running sequence.

Layout per layer: K and V `[max_num_seqs, num_kv_heads, state_size + 1, head_dim]`. A row holds
`num_entries[slot]` valid entries at indices `[0, num_entries)`; index `num_entries` is where
the incoming token is written before the policy decides which entry it replaces, hence the
extra entry. Keys are stored already rotated at their absolute position (`positions`), so
entries are order-free and an evicted one is overwritten in place.
"""

from __future__ import annotations

import torch

from tova_engine.model.config import ModelConfig
from tova_engine.parallel import SINGLE, TensorParallel
from tova_engine.snapshots import SnapshotSpec, StateSnapshot


class KVState:
    def __init__(
        self,
        model_config: ModelConfig,
        max_num_seqs: int,
        state_size: int,
        dtype: torch.dtype,
        device: torch.device,
        track_stats: bool,
        pad_slot: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """model_config: this rank's shapes (its share of the KV heads under tensor
        parallelism). pad_slot: one more row than max_num_seqs, never given to a sequence,
        where the padding rows of a CUDA graph's batch write (see cuda_graphs.py)."""
        c = model_config
        self.tp = tp
        # Query heads of a layer across all ranks: what the policies' attention averages over.
        self.total_heads = c.num_heads * tp.size
        self.num_layers = c.num_layers
        self.state_size = state_size
        self.dtype = dtype
        self.pad_slot = max_num_seqs if pad_slot else None
        rows = max_num_seqs + 1 if pad_slot else max_num_seqs
        shape = (rows, c.num_kv_heads, state_size + 1, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_layers)]
        entries = (c.num_layers, rows, state_size + 1)
        # Absolute position of the token held by each entry, per layer (layers evict apart).
        self.positions = torch.zeros(entries, dtype=torch.int64, device=device)
        # Accumulated attention per entry, for policies that keep a running statistic (H2O).
        stats_dtype = torch.promote_types(dtype, torch.float32)
        self.stats = (
            torch.zeros(entries, dtype=stats_dtype, device=device) if track_stats else None
        )
        self.num_entries = torch.zeros(rows, dtype=torch.int64, device=device)
        self.num_seen = torch.zeros(rows, dtype=torch.int64, device=device)
        self.capacity = torch.full((rows,), state_size, dtype=torch.int64, device=device)
        # The latest positions each row never evicts (its policy's `recent_count`).
        self.protect_recent = torch.zeros(rows, dtype=torch.int64, device=device)

    def head_mean(self, partial_sum: torch.Tensor) -> torch.Tensor:
        """Per-entry attention averaged over every query head of the layer, from this rank's
        heads' sum: all-reduced, so every rank scores (and evicts) the same entries."""
        return self.tp.all_reduce(partial_sum) / self.total_heads

    @staticmethod
    def bytes_per_sequence(model_config: ModelConfig, state_size: int, dtype: torch.dtype) -> int:
        """K and V of every layer for one sequence: constant whatever its length."""
        c = model_config
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * state_size * element

    def total_bytes(self) -> int:
        tensors = [*self.k, *self.v, self.positions, self.num_entries, self.num_seen,
                   self.capacity, self.protect_recent]
        if self.stats is not None:
            tensors.append(self.stats)
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset_slot(self, slot: int, capacity: int, protect_recent: int = 0) -> None:
        """Make a slot empty for a new sequence; stale K/V beyond num_entries is never read."""
        self.num_entries[slot] = 0
        self.num_seen[slot] = 0
        self.capacity[slot] = capacity
        self.protect_recent[slot] = protect_recent
        if self.stats is not None:
            self.stats[:, slot] = 0

    def copy_slot(self, src: int, dst: int) -> None:
        """Fork a sequence (n > 1 choices share one prefill)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst] = k[src]
            v[dst] = v[src]
        self.positions[:, dst] = self.positions[:, src]
        if self.stats is not None:
            self.stats[:, dst] = self.stats[:, src]
        for counter in (self.num_entries, self.num_seen, self.capacity, self.protect_recent):
            counter[dst] = counter[src]

    def retained_positions(self, slot: int) -> list[list[int]]:
        """Per layer, the sorted absolute positions the slot's state holds."""
        count = int(self.num_entries[slot])
        held = self.positions[:, slot, :count].sort(dim=-1).values
        return held.tolist()

    def snapshot(
        self, slot: int, spec: SnapshotSpec, pending_token_ids: list[int]
    ) -> StateSnapshot:
        """A host copy of the slot's state (its valid entries only)."""
        count = int(self.num_entries[slot])

        def host(t: torch.Tensor) -> torch.Tensor:  # a copy: on CPU .cpu() would be a view
            return t.to("cpu", copy=True)

        k = host(torch.stack([layer[slot, :, :count] for layer in self.k]))
        v = host(torch.stack([layer[slot, :, :count] for layer in self.v]))
        stats = None if self.stats is None else host(self.stats[:, slot, :count])
        positions = host(self.positions[:, slot, :count])
        return StateSnapshot(
            spec, int(self.num_seen[slot]), list(pending_token_ids), k, v, positions, stats
        )

    def restore(self, slot: int, snapshot: StateSnapshot, protect_recent: int = 0) -> None:
        """Put a snapshot's state in a slot (device copies; nothing is recomputed)."""
        count = snapshot.num_entries
        device = self.num_seen.device
        k = snapshot.k.to(device, non_blocking=True)
        v = snapshot.v.to(device, non_blocking=True)
        for layer in range(self.num_layers):
            self.k[layer][slot, :, :count] = k[layer]
            self.v[layer][slot, :, :count] = v[layer]
        self.positions[:, slot, :count] = snapshot.positions.to(device, non_blocking=True)
        if self.stats is not None:
            self.stats[:, slot] = 0
            if snapshot.stats is not None:
                self.stats[:, slot, :count] = snapshot.stats.to(device, non_blocking=True)
        self.num_entries[slot] = count
        self.num_seen[slot] = snapshot.num_seen
        self.capacity[slot] = snapshot.spec.capacity
        self.protect_recent[slot] = protect_recent
