"""A saved state's key/value heads split over tensor-parallel ranks and joined again.

A snapshot (`state/snapshots.py`) always holds every KV head of the model, whatever the
tensor-parallel size it was saved at: rank 0 joins its own heads with the other ranks'
(`join_heads`), and a state restored at size N gives each rank its block (`rank_heads`).
Rank r holds the r-th contiguous block of KV heads (`model/sharding.py`), so joining is a
concatenation in rank order. Positions, H2O statistics and counters are the same on every
rank (the ranks evict alike) and travel once.
"""

from __future__ import annotations

import dataclasses

import torch

from tova_engine.parallel import TensorParallel
from tova_engine.state.snapshots import Layers, StateSnapshot

# The parts that hold heads: k and v [kv_heads, entries, head_dim] per layer, a float8 state's
# scales [kv_heads, entries].
_HEAD_PARTS = ("k", "v", "k_scale", "v_scale")


def num_heads(snapshot: StateSnapshot) -> int:
    return snapshot.k[0].shape[0]


def rank_heads(snapshot: StateSnapshot, rank: int, size: int, copy: bool = False
               ) -> StateSnapshot:
    """Rank `rank`'s block of a snapshot that holds every head: views, or with `copy` tensors
    of their own (a pickled view carries its whole storage: every rank's heads)."""
    part = num_heads(snapshot) // size

    def block(layers: Layers) -> Layers:
        views = (t[rank * part : (rank + 1) * part] for t in layers)
        return tuple(v.clone() if copy else v for v in views)

    parts = {name: block(getattr(snapshot, name)) for name in _HEAD_PARTS
             if getattr(snapshot, name) is not None}
    return dataclasses.replace(snapshot, **parts)


def own_heads(snapshot: StateSnapshot, tp: TensorParallel, local_heads: int) -> StateSnapshot:
    """This rank's heads of a state it restores: rank 0's request holds every head (the
    core's snapshot), the other ranks' plans bring their block only."""
    heads = num_heads(snapshot)
    if heads == local_heads:
        return snapshot
    if heads != local_heads * tp.size:
        raise ValueError(
            f"the state holds {heads} key/value heads; this rank holds {local_heads} of "
            f"{local_heads * tp.size}"
        )
    return rank_heads(snapshot, tp.rank, tp.size)


def join_heads(shards: list[StateSnapshot]) -> StateSnapshot:
    """One snapshot with every rank's heads, rank order; the rest is the first shard's."""
    if len(shards) == 1:
        return shards[0]

    def joined(name: str) -> Layers:
        per_rank = [getattr(shard, name) for shard in shards]
        return tuple(torch.cat(layer, dim=0) for layer in zip(*per_rank, strict=True))

    first = shards[0]
    return dataclasses.replace(
        first, **{name: joined(name) for name in _HEAD_PARTS if getattr(first, name) is not None}
    )
