"""Where saved states wait between the turns of a conversation: host memory, then disk.

Device slots are for running requests only. A saved state (`StateSnapshot`) goes to the
host tier (page-locked on CUDA, least recently used out first, `host_bytes` at most); what
the host tier pushes out is written to the disk tier (`disk_dir`, one safetensors file per
snapshot, `disk_bytes` at most, least recently used deleted), which outlives the process: a
restarted engine finds its files again. Without a disk tier, what the host tier pushes out is
gone. The store lives in the engine core, beside the device it restores to.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path

import msgspec

from tova_engine.state.snapshots import StateSnapshot, read_metadata

logger = logging.getLogger("tova_engine")
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SUFFIX = ".safetensors"


class SavedState(msgspec.Struct, array_like=True, frozen=True):
    """A stored snapshot, as the front end knows it."""

    key: str
    num_tokens: int  # tokens it stands for
    nbytes: int


class StoreStats(msgspec.Struct, array_like=True):
    host_snapshots: int = 0
    host_bytes: int = 0
    disk_snapshots: int = 0
    disk_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0  # snapshots dropped for room (gone for good)
    spills: int = 0  # snapshots moved from the host tier to disk
    restores: int = 0
    restore_seconds: float = 0.0


class StateStore:
    def __init__(
        self, host_bytes: int, disk_dir: str | Path | None = None, disk_bytes: int = 0
    ) -> None:
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError("state store budgets must be >= 0 bytes")
        self.host_budget = host_bytes
        self.disk_budget = disk_bytes if disk_dir is not None else 0
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        self._host: OrderedDict[str, StateSnapshot] = OrderedDict()
        self._disk: OrderedDict[str, tuple[Path, int, int]] = OrderedDict()  # path, size, tokens
        self.counters = StoreStats()
        # Keys that left the store since last asked (for the front end's index).
        self._dropped: list[str] = []
        self._last_ns = 0
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self._scan_disk()

    # ----- the store ----------------------------------------------------------------------

    def put(self, key: str, snapshot: StateSnapshot) -> bool:
        """Store `snapshot` under `key` (replacing one there); False if no tier can hold it."""
        self._forget(key)
        if snapshot.nbytes <= self.host_budget:
            self._host[key] = snapshot.pinned()
            self._fit_host()
            return key in self._host or key in self._disk
        if self._write_disk(key, snapshot):
            return True
        self._dropped.append(key)
        return False

    def get(self, key: str) -> StateSnapshot | None:
        snapshot = self._host.get(key)
        if snapshot is not None:
            self._host.move_to_end(key)
        elif key in self._disk:
            path, _, _ = self._disk[key]
            try:
                snapshot = StateSnapshot.load(path)
            except Exception:  # a damaged file is a miss, not a crash
                logger.exception("state snapshot %s could not be read; dropping it", path)
                self._forget(key)
                self._dropped.append(key)
            else:
                self._disk.move_to_end(key)
                self._touch(path)
        if snapshot is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return snapshot

    def pop(self, key: str) -> StateSnapshot | None:
        """Take a snapshot out of the store (an in-process caller keeps it itself)."""
        snapshot = self._host.pop(key, None)
        if snapshot is None and key in self._disk:
            snapshot = StateSnapshot.load(self._disk[key][0])
        self._forget(key)
        return snapshot

    def delete(self, key: str) -> bool:
        found = key in self._host or key in self._disk
        self._forget(key)
        return found

    def __contains__(self, key: str) -> bool:
        return key in self._host or key in self._disk

    def saved(self) -> list[SavedState]:
        """Every stored snapshot (for a front end that starts or restarts)."""
        saved = [SavedState(k, s.num_tokens, s.nbytes) for k, s in self._host.items()]
        saved += [SavedState(k, tokens, size) for k, (_, size, tokens) in self._disk.items()]
        return saved

    def take_dropped(self) -> list[str]:
        dropped, self._dropped = self._dropped, []
        return dropped

    def note_restore(self, seconds: float) -> None:
        self.counters.restores += 1
        self.counters.restore_seconds += seconds

    def stats(self) -> StoreStats:
        c = self.counters
        return StoreStats(
            host_snapshots=len(self._host),
            host_bytes=sum(s.nbytes for s in self._host.values()),
            disk_snapshots=len(self._disk),
            disk_bytes=sum(size for _, size, _ in self._disk.values()),
            hits=c.hits,
            misses=c.misses,
            evictions=c.evictions,
            spills=c.spills,
            restores=c.restores,
            restore_seconds=c.restore_seconds,
        )

    # ----- tiers --------------------------------------------------------------------------

    def _fit_host(self) -> None:
        used = sum(s.nbytes for s in self._host.values())
        while used > self.host_budget and self._host:
            key, snapshot = self._host.popitem(last=False)
            used -= snapshot.nbytes
            if self._write_disk(key, snapshot):
                self.counters.spills += 1
            else:
                self.counters.evictions += 1
                self._dropped.append(key)

    def _write_disk(self, key: str, snapshot: StateSnapshot) -> bool:
        if self.disk_dir is None or snapshot.nbytes > self.disk_budget:
            return False
        path = self.disk_dir / (_file_stem(key) + _SUFFIX)
        size = snapshot.save(path, key)
        self._touch(path)
        self._disk[key] = (path, size, snapshot.num_tokens)
        self._fit_disk()
        return key in self._disk

    def _fit_disk(self) -> None:
        used = sum(size for _, size, _ in self._disk.values())
        while used > self.disk_budget and self._disk:
            key, (path, size, _) = self._disk.popitem(last=False)
            path.unlink(missing_ok=True)
            used -= size
            self.counters.evictions += 1
            self._dropped.append(key)

    def _touch(self, path: Path) -> None:
        """Strictly increasing modification times: the use order survives a restart."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        os.utime(path, ns=(self._last_ns, self._last_ns))

    def _forget(self, key: str) -> None:
        self._host.pop(key, None)
        entry = self._disk.pop(key, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)

    def _scan_disk(self) -> None:
        """Index the snapshots a previous engine left, least recently used first."""
        files = sorted(self.disk_dir.glob("*" + _SUFFIX), key=lambda p: p.stat().st_mtime_ns)
        started = time.perf_counter()
        for path in files:
            try:
                meta = read_metadata(path)
                key = meta.get("key") or path.stem
            except Exception:
                logger.warning("ignoring %s: not a state snapshot", path)
                continue
            tokens = meta["num_seen"] + len(meta["pending_token_ids"])
            stat = path.stat()
            self._disk[key] = (path, stat.st_size, tokens)
            self._last_ns = max(self._last_ns, stat.st_mtime_ns)
        self._fit_disk()
        if self._disk:
            logger.info(
                "state store: %d snapshots on disk in %s (indexed in %.2f s)",
                len(self._disk),
                self.disk_dir,
                time.perf_counter() - started,
            )


def _file_stem(key: str) -> str:
    if _SAFE_KEY.fullmatch(key):
        return key
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:40]
