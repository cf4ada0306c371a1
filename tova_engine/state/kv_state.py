"""The bounded multi-state: per-layer key/value buffers, one row (slot) per running sequence.

Layout per layer: K and V `[max_num_seqs, num_kv_heads, size + 1, head_dim]`, where `size` is
the layer's (`layer_sizes`): the engine's state_size S for a global layer, min(window - 1, S)
for a sliding-window (local) layer (`layer_state_sizes` says why). A row holds `num_entries[slot]`
valid entries in a global layer, `min(num_entries[slot], size)` in a local one, at indices
`[0, entries)`; index `entries` is where the incoming token is written before the policy
decides which entry it replaces, hence the extra entry. Keys are stored already rotated at
their absolute position (`positions`), so entries are order-free and an evicted one is
overwritten in place.

Every layer of a row has read the same tokens and none evicts before it is full, so one
counter per row gives every layer's entries: min(tokens read, capacity, layer size).

With `kv_cache_dtype="fp8"` each layer's K and V are `Fp8KV`s (fp8_buffer.py): float8 values
with a scale per head vector, indexed like the tensors, dequantized as they are read.
"""

from __future__ import annotations

import torch

from tova_engine.model.config import ModelConfig
from tova_engine.parallel import SINGLE, TensorParallel
from tova_engine.state.fp8_buffer import Fp8KV, entry_bytes
from tova_engine.state.snapshots import SnapshotSpec, StateSnapshot

LAYER_KINDS = ("global", "local")
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype


def layer_state_sizes(config: ModelConfig, state_size: int) -> list[int]:
    """Entries each layer's state holds at most. A sliding layer's query at position p sees
    the positions (p - window, p] (transformers: key > query - window), itself included, so
    the window - 1 positions before it are all its state ever needs; whatever the policy,
    it keeps the latest of them."""
    sizes = []
    for layer in range(config.num_layers):
        window = config.layer_window(layer)
        sizes.append(state_size if window is None else min(window - 1, state_size))
    return sizes


def layer_kind(config: ModelConfig, layer: int) -> str:
    return "global" if config.layer_window(layer) is None else "local"


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
        cache_rows: int = 0,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """model_config: this rank's shapes (its share of the KV heads under tensor
        parallelism). pad_slot: one more row than max_num_seqs, never given to a sequence,
        where the padding rows of a CUDA graph's batch write (see execution/decode_graphs.py).
        cache_rows: rows after those that hold cached prefix states (core/prefix_cache.py),
        copied to and from slots like a fork (`copy_slot`). kv_cache_dtype: "fp8" stores K
        and V in float8 with scales (fp8_buffer.py); "auto" in `dtype`."""
        c = model_config
        self.fp8 = kv_cache_dtype == "fp8"
        self.tp = tp
        # Query heads of a layer across all ranks: what the policies' attention averages over.
        self.total_heads = c.num_heads * tp.size
        self.num_layers = c.num_layers
        self.state_size = state_size
        self.layer_sizes = layer_state_sizes(c, state_size)
        self.local_layers = [c.layer_window(layer) is not None for layer in range(c.num_layers)]
        # Every local layer has the one window, so one size (None: no local layers).
        self.local_size = next(
            (size for size, local in zip(self.layer_sizes, self.local_layers, strict=True)
             if local), None)
        # Attention logits are q.k / sqrt(attention_scalar) (head_dim, or Gemma's scalar).
        self.attention_scalar = c.attention_scalar
        # Positions a sliding layer's query sees, itself included (None: no sliding layers).
        self.sliding_window = c.sliding_window
        self.dtype = dtype
        self.pad_slot = max_num_seqs if pad_slot else None
        first_cache_row = max_num_seqs + 1 if pad_slot else max_num_seqs
        self.cache_rows = range(first_cache_row, first_cache_row + cache_rows)
        rows = first_cache_row + cache_rows

        def buffer(size: int) -> torch.Tensor | Fp8KV:
            shape = (rows, c.num_kv_heads, size + 1, c.head_dim)
            if self.fp8:
                return Fp8KV(shape, dtype, device)
            return torch.zeros(shape, dtype=dtype, device=device)

        self.k = [buffer(size) for size in self.layer_sizes]
        self.v = [buffer(size) for size in self.layer_sizes]
        # Positions and statistics are S + 1 wide in every layer: one tensor, a small
        # fraction of K/V's bytes; a local layer's entries past its size are never read.
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
        # What local layers read instead: their window keeps the latest by construction.
        self.no_protection = (
            torch.zeros(rows, dtype=torch.int64, device=device)
            if self.local_size is not None
            else None
        )

    def is_local(self, layer: int) -> bool:
        """A sliding-window layer (whatever its size: with S below the window it is S)."""
        return self.local_layers[layer]

    def layer_entries(self, layer: int, entries: int) -> int:
        """A layer's valid entries when a global layer holds `entries`."""
        return min(entries, self.layer_sizes[layer])

    def head_mean(self, partial_sum: torch.Tensor) -> torch.Tensor:
        """Per-entry attention averaged over every query head of the layer, from this rank's
        heads' sum: all-reduced, so every rank scores (and evicts) the same entries."""
        return self.tp.all_reduce(partial_sum) / self.total_heads

    @staticmethod
    def bytes_per_sequence(
        model_config: ModelConfig, state_size: int, dtype: torch.dtype, fp8: bool = False
    ) -> int:
        """K and V of every layer for one sequence: constant whatever its length. fp8: the
        float8 state's (values and scales)."""
        return sum(KVState.bytes_by_kind(model_config, state_size, dtype, fp8).values())

    @staticmethod
    def bytes_by_kind(
        model_config: ModelConfig, state_size: int, dtype: torch.dtype, fp8: bool = False
    ) -> dict[str, int]:
        """K and V bytes per sequence of the global and of the local (sliding-window) layers."""
        c = model_config
        per_entry = 2 * c.num_kv_heads * entry_bytes(c.head_dim, dtype, fp8)
        totals = dict.fromkeys(LAYER_KINDS, 0)
        for layer, size in enumerate(layer_state_sizes(c, state_size)):
            totals[layer_kind(c, layer)] += per_entry * size
        return totals

    @staticmethod
    def bytes_saved_per_sequence(
        model_config: ModelConfig, state_size: int, dtype: torch.dtype, fp8: bool = False
    ) -> int:
        """What sliding-window layers save per sequence against every layer holding
        `state_size` entries."""
        c = model_config
        uniform = 2 * c.num_layers * c.num_kv_heads * entry_bytes(c.head_dim, dtype, fp8)
        return uniform * state_size - KVState.bytes_per_sequence(c, state_size, dtype, fp8)

    def total_bytes(self) -> int:
        tensors = [self.positions, self.num_entries, self.num_seen, self.capacity,
                   self.protect_recent]
        for optional in (self.stats, self.no_protection):
            if optional is not None:
                tensors.append(optional)
        kv = sum(b.nbytes() if self.fp8 else b.numel() * b.element_size()
                 for b in (*self.k, *self.v))
        return kv + sum(t.numel() * t.element_size() for t in tensors)

    def reset_slot(self, slot: int, capacity: int, protect_recent: int = 0) -> None:
        """Make a slot empty for a new sequence; stale K/V beyond num_entries is never read."""
        self.num_entries[slot] = 0
        self.num_seen[slot] = 0
        self.capacity[slot] = capacity
        self.protect_recent[slot] = protect_recent
        if self.stats is not None:
            self.stats[:, slot] = 0

    def row_bytes(self) -> int:
        """One row's share of `total_bytes`: what a slot or a cached prefix state takes."""
        return self.total_bytes() // self.num_seen.shape[0]

    def copy_slot(self, src: int, dst: int) -> None:
        """Fork a sequence (n > 1 choices share one prefill), or save a prefix's state to a
        cache row and restore it into a slot: every layer, the positions, statistics and
        counters, as device copies."""
        for k, v in zip(self.k, self.v, strict=True):
            if self.fp8:  # the stored bytes: what the slot holds, exactly
                k.copy_rows(dst, src)
                v.copy_rows(dst, src)
            else:
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
        return [
            self.positions[layer, slot, : self.layer_entries(layer, count)].sort().values.tolist()
            for layer in range(self.num_layers)
        ]

    def snapshot(
        self, slot: int, spec: SnapshotSpec, pending_token_ids: list[int]
    ) -> StateSnapshot:
        """A host copy of the slot's state (each layer's valid entries only)."""
        count = int(self.num_entries[slot])
        counts = [self.layer_entries(layer, count) for layer in range(self.num_layers)]

        def stored(buffers) -> list[torch.Tensor]:  # float8 ones as stored, no dequantizing
            return [(b.data if self.fp8 else b)[slot, :, :n]
                    for b, n in zip(buffers, counts, strict=True)]

        kv = _to_host([*stored(self.k), *stored(self.v)])
        positions = _to_host([self.positions[i, slot, :n] for i, n in enumerate(counts)])
        stats = scales = None
        if self.stats is not None:
            stats = _to_host([self.stats[i, slot, :n] for i, n in enumerate(counts)])
        if self.fp8:
            scales = _to_host([b.scale[slot, :, :n] for b, n in
                               zip([*self.k, *self.v], counts * 2, strict=True)])
        k, v = kv[: self.num_layers], kv[self.num_layers :]
        snapshot = StateSnapshot(
            spec, int(self.num_seen[slot]), list(pending_token_ids), k, v, positions, stats
        )
        if scales is not None:
            snapshot.k_scale, snapshot.v_scale = scales[: self.num_layers], scales[self.num_layers:]
        return snapshot

    def restore(self, slot: int, snapshot: StateSnapshot, protect_recent: int = 0) -> None:
        """Put a snapshot's state in a slot (device copies; nothing is recomputed)."""
        device = self.num_seen.device

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        if self.stats is not None:
            self.stats[:, slot] = 0
        for layer in range(self.num_layers):
            n = snapshot.k[layer].shape[1]
            if self.fp8:  # as stored (the spec says it was made with a float8 state)
                for buffer, data, scale in ((self.k[layer], snapshot.k, snapshot.k_scale),
                                            (self.v[layer], snapshot.v, snapshot.v_scale)):
                    buffer.data[slot, :, :n] = dev(data[layer])
                    buffer.scale[slot, :, :n] = dev(scale[layer])
            else:
                self.k[layer][slot, :, :n] = dev(snapshot.k[layer])
                self.v[layer][slot, :, :n] = dev(snapshot.v[layer])
            self.positions[layer, slot, :n] = dev(snapshot.positions[layer])
            if self.stats is not None and snapshot.stats is not None:
                self.stats[layer, slot, :n] = dev(snapshot.stats[layer])
        self.num_entries[slot] = snapshot.num_entries
        self.num_seen[slot] = snapshot.num_seen
        self.capacity[slot] = snapshot.spec.capacity
        self.protect_recent[slot] = protect_recent


def _to_host(parts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Host copies of device tensors of one dtype through one device-to-host copy (one per
    layer would be 4 x layers synchronising copies per saved state); each its own storage,
    as a snapshot file's tensors must be."""
    flat = torch.cat([part.reshape(-1) for part in parts])  # a new tensor: never a view
    flat = flat.to("cpu")
    pieces = flat.split([part.numel() for part in parts])
    return tuple(
        piece.view(part.shape).clone() for piece, part in zip(pieces, parts, strict=True)
    )
