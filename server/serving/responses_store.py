"""Stored responses (`store: true`): the Responses API object for GET, and what continuing it
needs besides its saved state (the answer's last token, the configuration it ran with).

A record lives as long as its saved state in the engine's store: when the engine drops the
state (its budgets), the record goes too, and the id is a 404 everywhere. With a directory
(the state directory's `responses/`, or one the front ends of a server share) the records are
JSON files, and the files are the only copy: other front ends and other replicas mounting the
same directory write and delete them too, so a record is read from its file every time and
never kept in memory, where it could hide a deletion made elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tova_engine import SnapshotSpec

logger = logging.getLogger("server")
_SAFE_ID = re.compile(r"resp_[0-9a-f]{32}")
# A directory of records is swept for those whose state is gone at most this often (it lists
# every file; a lookup checks its own record's state anyway).
SWEEP_INTERVAL_S = 60.0
# A record this new is never swept: its state may be so new that this front end's view of the
# engine's store has not caught up yet.
SWEEP_MIN_AGE_S = 30.0


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]  # the Responses API object, as GET returns it
    last_token_id: int | None  # the answer's last token (the saved state's pending one)
    spec: SnapshotSpec  # what the state can only be continued with
    # The request's input as Responses items (GET .../input_items); none in older files.
    input_items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.response["id"]

    def to_json(self) -> str:
        # The spec's fields beside the others, as the files have always held them.
        return json.dumps({"response": self.response, "last_token_id": self.last_token_id,
                           "input_items": self.input_items, **asdict(self.spec)})

    @classmethod
    def from_json(cls, text: str) -> StoredResponse:
        record = json.loads(text)
        # (A field the spec gained later is absent from older files: its default holds.)
        spec = SnapshotSpec(**{field.name: record.pop(field.name)
                               for field in fields(SnapshotSpec) if field.name in record})
        return cls(spec=spec, **record)


class ResponseStore:
    def __init__(self, directory: str | Path | None = None) -> None:
        self._records: dict[str, StoredResponse] = {}  # without a directory only
        self.directory = None if directory is None else Path(directory)
        self._swept_at: float | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        if self.directory is None:
            return len(self._records)
        return sum(1 for _ in self.directory.glob("resp_*.json"))

    def get(self, response_id: str) -> StoredResponse | None:
        if self.directory is None:
            return self._records.get(response_id)
        if not _SAFE_ID.fullmatch(response_id):  # never a path of the client's
            return None
        return self._read(self._path(response_id))

    def put(self, record: StoredResponse) -> None:
        if self.directory is None:
            self._records[record.id] = record
            return
        path = self._path(record.id)
        # Whole or absent for every reader, and readable by the other replicas' processes
        # (the default mode, not a private temp file's).
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        tmp.write_text(record.to_json())
        os.replace(tmp, path)

    def delete(self, response_id: str) -> bool:
        if self.directory is None:
            return self._records.pop(response_id, None) is not None
        if not _SAFE_ID.fullmatch(response_id):
            return False
        try:
            self._path(response_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def prune(self, alive: Callable[[str], bool]) -> None:
        """Drop the records whose saved state is gone (`alive(id)` false). In memory at every
        call; a directory in the background, at most every SWEEP_INTERVAL_S."""
        if self.directory is None:
            for response_id in [i for i in self._records if not alive(i)]:
                self.delete(response_id)
            return
        now = time.monotonic()
        if self._swept_at is not None and now - self._swept_at < SWEEP_INTERVAL_S:
            return
        self._swept_at = now
        threading.Thread(target=self._sweep, args=(alive,), name="responses-sweep",
                         daemon=True).start()

    def _sweep(self, alive: Callable[[str], bool]) -> None:
        settled = time.time() - SWEEP_MIN_AGE_S
        swept = 0
        for path in self.directory.glob("resp_*.json"):
            with contextlib.suppress(FileNotFoundError):  # another front end was first
                if path.stat().st_mtime < settled and not alive(path.stem):
                    path.unlink()
                    swept += 1
        if swept:
            logger.info("stored responses: %d whose state is gone removed from %s", swept,
                        self.directory)

    def _path(self, response_id: str) -> Path:
        if not _SAFE_ID.fullmatch(response_id):  # ids are ours; never a path of the client's
            raise ValueError(f"not a response id: {response_id!r}")
        return self.directory / f"{response_id}.json"

    @staticmethod
    def _read(path: Path) -> StoredResponse | None:
        try:
            return StoredResponse.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except Exception:
            logger.warning("ignoring %s: not a stored response", path)
            return None
