"""A sequence's bounded state, saved so that a conversation can continue from it.

A multi-state RNN's state has a fixed size whatever the length of what it has read, so a
finished request's state (K/V of every layer, the positions each entry holds, the H2O
statistics where the policy keeps them, the counters) is all a later request needs to go on
from where it stopped: it prefills only its new tokens. The token sampled last has not been
fed to the state yet (no step ran after it); a continuation feeds it first
(`pending_token_ids`), so continuing equals one request over the whole token stream.

A snapshot records what it was made with (`SnapshotSpec`); continuing it under another model,
dtype, state size, policy or K/V storage (`kv_cache_dtype`) is refused. A float8 state is
saved as stored, its scales beside it.
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
    kv_cache_dtype: str = "auto"  # "fp8": K/V stored in float8 with scales

    def mismatch(self, other: SnapshotSpec) -> str | None:
        """What differs, in words, or None."""
        labels = {
            "model": "model",
            "dtype": "dtype",
            "state_size": "the engine's state_size",
            "capacity": "state_size",
            "policy": "policy",
            "kv_cache_dtype": "kv_cache_dtype",
        }
        for name, label in labels.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"it was made with {label} {mine!r}, this request runs with {theirs!r}"
        return None


Layers = tuple[torch.Tensor, ...]  # one tensor per layer: layers hold different counts


@dataclass(slots=True, eq=False)
class StateSnapshot:
    spec: SnapshotSpec
    num_seen: int  # tokens fed to the state: the next token's RoPE position
    pending_token_ids: list[int]  # sampled, not yet fed: a continuation feeds them first
    # Per layer, on the host: [kv_heads, entries, head_dim]; a sliding-window layer holds
    # fewer entries than a global one.
    k: Layers
    v: Layers
    positions: Layers  # per layer [entries] int64
    stats: Layers | None = None  # per layer [entries], policies with a running statistic
    # A float8 state's scales, per layer [kv_heads, entries] (k and v then hold float8).
    k_scale: Layers | None = None
    v_scale: Layers | None = None

    @property
    def num_entries(self) -> int:
        """Entries of the fullest layer (a global one's): the state's `num_entries`."""
        return max(layer.shape[1] for layer in self.k)

    @property
    def num_tokens(self) -> int:
        """Tokens the snapshot stands for: everything read and generated so far."""
        return self.num_seen + len(self.pending_token_ids)

    def _parts(self) -> dict[str, Layers]:
        parts = {"k": self.k, "v": self.v, "positions": self.positions}
        for name in ("stats", "k_scale", "v_scale"):
            if getattr(self, name) is not None:
                parts[name] = getattr(self, name)
        return parts

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self._parts().values() for t in part)

    def pinned(self) -> StateSnapshot:
        """The same in page-locked memory (fast, asynchronous copies to the device)."""
        if not torch.cuda.is_available() or self.k[0].is_pinned():
            return self

        def pin(layers: Layers | None) -> Layers | None:
            return None if layers is None else tuple(t.pin_memory() for t in layers)

        return StateSnapshot(
            self.spec,
            self.num_seen,
            list(self.pending_token_ids),
            pin(self.k),
            pin(self.v),
            pin(self.positions),
            pin(self.stats),
            pin(self.k_scale),
            pin(self.v_scale),
        )

    # ----- files --------------------------------------------------------------------------

    def save(self, path: Path, key: str | None = None) -> int:
        """Write `path` (safetensors, metadata and `key` in its header); returns its size.
        Layer i's tensors are "k.i", "v.i", "positions.i" (and "stats.i"; a float8 state's
        "k_scale.i", "v_scale.i")."""
        tensors = {
            f"{name}.{i}": t for name, part in self._parts().items() for i, t in enumerate(part)
        }
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
            _layers(tensors, "k"),
            _layers(tensors, "v"),
            _layers(tensors, "positions"),
            *(_layers(tensors, name) if f"{name}.0" in tensors or name in tensors else None
              for name in ("stats", "k_scale", "v_scale")),
        )


def _layers(tensors: dict[str, torch.Tensor], name: str) -> Layers:
    """Layer i's tensor is `name.i`; files written before layers could differ in size hold
    one `name` tensor with the layers stacked first."""
    if name in tensors:
        return tuple(tensors[name].unbind(0))
    count = sum(1 for key in tensors if key.startswith(f"{name}."))
    return tuple(tensors[f"{name}.{i}"] for i in range(count))


def read_metadata(path: Path) -> dict:
    """A snapshot file's metadata (spec, counters, pending tokens, key), without its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["tova"])
