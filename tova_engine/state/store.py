"""Where saved states wait between the turns of a conversation: host memory and a directory.

Device slots are for running requests only. A saved state (`StateSnapshot`) goes to the
host tier (page-locked on CUDA, least recently used out first, `host_bytes` at most). With a
directory (`disk_dir`, `disk_bytes` at most, least recently used deleted) every state is also
written there when it is saved, one safetensors file per snapshot, before the step that
finished its request reports it: the directory is the durable tier, the host tier a cache of
it (what it pushes out is already on disk). Files outlive the process, so a restarted engine
finds them, and several engines may share the directory (replicas mounting one volume), so
the store reads it as others change it:
- a key it does not know is looked up there (another engine wrote it);
- a cached copy is used only while its file is still the one this store knows: deleted
  (another engine's DELETE or budget) is gone, written again is read again;
- deleting a key removes its file, whoever wrote it.
Without a directory, what the host tier pushes out is gone. The store lives in the engine core,
beside the device it restores to.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

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
    spills: int = 0  # snapshots the host tier let go of while their file stays
    restores: int = 0
    restore_seconds: float = 0.0


class _File(NamedTuple):
    path: Path
    size: int
    tokens: int
    # (device, inode, change time, size) when this store last wrote or used it: a file
    # written again under the same name (temp file + rename) differs in one of them even
    # where the file system reuses the freed inode, so a cached copy of the old one is never
    # taken for it. (Another engine's use changes the time too: a needless re-read.)
    identity: tuple[int, int, int, int]


def snapshot_path(directory: str | Path, key: str) -> Path:
    """Where the snapshot stored under `key` lives in a store's directory."""
    return Path(directory) / (_file_stem(key) + _SUFFIX)


def read_saved_state(path: Path) -> SavedState | None:
    """What the snapshot file at `path` stands for, from its header alone; None if there is
    no such file or it is not a snapshot."""
    try:
        meta = read_metadata(path)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    except Exception:
        logger.warning("ignoring %s: not a state snapshot", path)
        return None
    tokens = meta["num_seen"] + len(meta["pending_token_ids"])
    return SavedState(meta.get("key") or path.stem, tokens, size)


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
        # The files this store wrote, read or found at start, least recently used first.
        self._disk: OrderedDict[str, _File] = OrderedDict()
        self.counters = StoreStats()
        # Keys that left the store since last asked (for the front end's index).
        self._dropped: list[str] = []
        self._last_ns = 0
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self._scan_disk()

    # ----- the store ----------------------------------------------------------------------

    def put(self, key: str, snapshot: StateSnapshot) -> bool:
        """Store `snapshot` under `key` (replacing one there); False if no tier can hold it.
        With a directory its file is written before this returns."""
        self._forget(key)
        self._write_disk(key, snapshot)
        if snapshot.nbytes <= self.host_budget:
            self._host[key] = snapshot.pinned()
            self._fit_host()
        if key in self._host or key in self._disk:
            return True
        self._dropped.append(key)
        return False

    def get(self, key: str) -> StateSnapshot | None:
        snapshot = self._find(key)
        if snapshot is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return snapshot

    def pop(self, key: str) -> StateSnapshot | None:
        """Take a snapshot out of the store (an in-process caller keeps it itself)."""
        snapshot = self._find(key)
        self._forget(key)
        return snapshot

    def delete(self, key: str) -> bool:
        found = key in self
        if self.disk_dir is not None:
            found = found or snapshot_path(self.disk_dir, key).exists()
        self._forget(key)
        return found

    def __contains__(self, key: str) -> bool:
        return key in self._host or key in self._disk

    def saved(self) -> list[SavedState]:
        """Every stored snapshot (for a front end that starts or restarts)."""
        saved = [SavedState(k, s.num_tokens, s.nbytes) for k, s in self._host.items()]
        saved += [SavedState(k, f.tokens, f.size) for k, f in self._disk.items()
                  if k not in self._host]
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
            disk_bytes=sum(f.size for f in self._disk.values()),
            hits=c.hits,
            misses=c.misses,
            evictions=c.evictions,
            spills=c.spills,
            restores=c.restores,
            restore_seconds=c.restore_seconds,
        )

    # ----- finding a key ------------------------------------------------------------------

    def _find(self, key: str) -> StateSnapshot | None:
        self._reconcile(key)
        snapshot = self._host.get(key)
        if snapshot is not None:
            self._host.move_to_end(key)
            if key in self._disk:  # its file is as recently used (the order others see)
                self._used(key)
            return snapshot
        file = self._disk.get(key)
        if file is None:
            return None
        try:
            snapshot = StateSnapshot.load(file.path)
        except FileNotFoundError:  # deleted since `_reconcile` looked
            self._gone(key)
            return None
        except Exception:  # a damaged file is a miss, not a crash
            logger.exception("state snapshot %s could not be read; dropping it", file.path)
            self._gone(key)
            return None
        self._used(key)
        return snapshot

    def _used(self, key: str) -> None:
        self._disk.move_to_end(key)
        file = self._disk[key]
        self._touch(file.path)
        with contextlib.suppress(FileNotFoundError):
            self._disk[key] = file._replace(identity=_identity(file.path.stat()))

    def _reconcile(self, key: str) -> None:
        """Bring what this store knows of `key` in line with the directory, which other
        engines may have changed: a file gone takes the key with it, a file new or written
        again replaces any cached copy."""
        if self.disk_dir is None:
            return
        path = snapshot_path(self.disk_dir, key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            if key in self._disk:  # deleted or evicted elsewhere: gone everywhere
                self._gone(key)
            return  # (a host-only copy, never written, stays)
        known = self._disk.get(key)
        if known is not None and known.identity == _identity(stat):
            return
        found = read_saved_state(path)
        if found is None:  # damaged: a miss, not a crash
            if key in self:
                self._gone(key)
            return
        self._host.pop(key, None)
        self._disk[key] = _File(path, found.nbytes, found.num_tokens, _identity(stat))
        self._fit_disk()

    # ----- tiers --------------------------------------------------------------------------

    def _fit_host(self) -> None:
        used = sum(s.nbytes for s in self._host.values())
        while used > self.host_budget and self._host:
            key, snapshot = self._host.popitem(last=False)
            used -= snapshot.nbytes
            if key in self._disk:
                self.counters.spills += 1
            else:
                self.counters.evictions += 1
                self._dropped.append(key)

    def _write_disk(self, key: str, snapshot: StateSnapshot) -> bool:
        if self.disk_dir is None or snapshot.nbytes > self.disk_budget:
            return False
        path = snapshot_path(self.disk_dir, key)
        try:
            size = snapshot.save(path, key)
            self._touch(path)
            identity = _identity(path.stat())
        except OSError:  # a full or unreachable volume: the host tier may still keep it
            logger.exception("could not write saved state %s", path)
            return False
        self._disk[key] = _File(path, size, snapshot.num_tokens, identity)
        self._fit_disk()
        return key in self._disk

    def _fit_disk(self) -> None:
        used = sum(f.size for f in self._disk.values())
        while used > self.disk_budget and self._disk:
            key, file = self._disk.popitem(last=False)
            file.path.unlink(missing_ok=True)
            self._host.pop(key, None)  # the file was the state's lifetime
            used -= file.size
            self.counters.evictions += 1
            self._dropped.append(key)

    def _touch(self, path: Path) -> None:
        """Strictly increasing modification times: the use order survives a restart (and
        an engine that starts on a shared directory sees every engine's use)."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        # (A file another engine deleted meanwhile: the next look finds out.)
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, ns=(self._last_ns, self._last_ns))

    def _gone(self, key: str) -> None:
        self._forget(key)
        self._dropped.append(key)

    def _forget(self, key: str) -> None:
        self._host.pop(key, None)
        self._disk.pop(key, None)
        if self.disk_dir is not None:  # known here or written by another engine
            snapshot_path(self.disk_dir, key).unlink(missing_ok=True)

    def _scan_disk(self) -> None:
        """Index the snapshots in the directory (a previous engine's, or other engines'
        sharing it), least recently used first."""
        started = time.perf_counter()
        files = []
        for path in self.disk_dir.glob("*" + _SUFFIX):
            try:
                files.append((path.stat(), path))
            except FileNotFoundError:  # deleted by another engine meanwhile
                continue
        for stat, path in sorted(files, key=lambda item: item[0].st_mtime_ns):
            found = read_saved_state(path)
            if found is None:
                continue
            self._disk[found.key] = _File(path, found.nbytes, found.num_tokens, _identity(stat))
            self._last_ns = max(self._last_ns, stat.st_mtime_ns)
        self._fit_disk()
        if self._disk:
            logger.info(
                "state store: %d snapshots on disk in %s (indexed in %.2f s)",
                len(self._disk),
                self.disk_dir,
                time.perf_counter() - started,
            )


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns, stat.st_size


def _file_stem(key: str) -> str:
    if _SAFE_KEY.fullmatch(key):
        return key
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:40]
