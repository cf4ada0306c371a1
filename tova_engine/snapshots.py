"""A sequence's bounded state, saved so that a conversation can continue from it.

A multi-state RNN's state has a fixed size whatever the length of what it has read, so a
finished request's state (K/V of every layer, the positions each entry holds, the H2O
statistics where the policy keeps them, the counters) is all a later request needs to go on
from where it stopped: it prefills only its new tokens. The token sampled last has not been
fed to the state yet (no step ran after it); a continuation feeds it first
(`pending_token_ids`), so continuing equals one request over the whole token stream.

A snapshot records what it was made with (`SnapshotSpec`); continuing it under another model,
dtype, state size or policy is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@dataclass(frozen=True, slots=True)
class SnapshotSpec:
    """What a snapshot can only be continued with."""

    model: str
    dtype: str
    state_size: int  # the engine's
    capacity: int  # the request's own state size (at most the engine's)
    policy: str

    def mismatch(self, other: SnapshotSpec) -> str | None:
        """What differs, in words, or None."""
        labels = {
            "model": "model",
            "dtype": "dtype",
            "state_size": "the engine's state_size",
            "capacity": "state_size",
            "policy": "policy",
        }
        for name, label in labels.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"it was made with {label} {mine!r}, this request runs with {theirs!r}"
        return None


@dataclass(slots=True, eq=False)
class StateSnapshot:
    spec: SnapshotSpec
    num_seen: int  # tokens fed to the state: the next token's RoPE position
    pending_token_ids: list[int]  # sampled, not yet fed: a continuation feeds them first
    k: torch.Tensor  # [layers, kv_heads, entries, head_dim], on the host
    v: torch.Tensor
    positions: torch.Tensor  # [layers, entries] int64
    stats: torch.Tensor | None = None  # [layers, entries], policies with a running statistic

    @property
    def num_entries(self) -> int:
        return self.k.shape[2]

    @property
    def num_tokens(self) -> int:
        """Tokens the snapshot stands for: everything read and generated so far."""
        return self.num_seen + len(self.pending_token_ids)

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v, self.positions]
        if self.stats is not None:
            tensors.append(self.stats)
        return sum(t.numel() * t.element_size() for t in tensors)

    def pinned(self) -> StateSnapshot:
        """The same in page-locked memory (fast, asynchronous copies to the device)."""
        if not torch.cuda.is_available() or self.k.is_pinned():
            return self
        stats = None if self.stats is None else self.stats.pin_memory()
        return StateSnapshot(
            self.spec,
            self.num_seen,
            list(self.pending_token_ids),
            self.k.pin_memory(),
            self.v.pin_memory(),
            self.positions.pin_memory(),
            stats,
        )

    # ----- files --------------------------------------------------------------------------

    def save(self, path: Path, key: str | None = None) -> int:
        """Write `path` (safetensors, metadata and `key` in its header); returns its size."""
        tensors = {"k": self.k, "v": self.v, "positions": self.positions}
        if self.stats is not None:
            tensors["stats"] = self.stats
        meta = {
            "spec": asdict(self.spec),
            "num_seen": self.num_seen,
            "pending_token_ids": self.pending_token_ids,
            "key": key,
        }
        tmp = path.with_suffix(".tmp")
        save_file(
            {name: t.contiguous() for name, t in tensors.items()},
            str(tmp),
            metadata={"tova": json.dumps(meta)},
        )
        tmp.replace(path)  # whole or absent, even if the process dies mid-write
        return path.stat().st_size

    @classmethod
    def load(cls, path: Path) -> StateSnapshot:
        meta = read_metadata(path)
        tensors = load_file(str(path))
        return cls(
            SnapshotSpec(**meta["spec"]),
            meta["num_seen"],
            meta["pending_token_ids"],
            tensors["k"],
            tensors["v"],
            tensors["positions"],
            tensors.get("stats"),
        )


def read_metadata(path: Path) -> dict:
    """A snapshot file's metadata (spec, counters, pending tokens, key), without its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["tova"])
