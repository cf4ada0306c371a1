"""Stored responses (`store: true`): the Responses API object for GET, and what continuing it
needs besides its saved state (the answer's last token, the configuration it ran with).

A record lives as long as its saved state in the engine's store: when the engine drops the
state (its budgets), the record goes too, and the id is a 404 everywhere. With a state
directory the records are JSON files beside the states and survive a restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tova_engine import SnapshotSpec

logger = logging.getLogger("server")
_SAFE_ID = re.compile(r"resp_[0-9a-f]{32}")


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
        self._records: dict[str, StoredResponse] = {}
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, response_id: str) -> StoredResponse | None:
        record = self._records.get(response_id)
        if record is None and self.directory is not None and _SAFE_ID.fullmatch(response_id):
            # Written by another front end sharing the directory (--api-server-count).
            record = self._read(self._path(response_id))
            if record is not None:
                self._records[response_id] = record
        return record

    def put(self, record: StoredResponse) -> None:
        self._records[record.id] = record
        if self.directory is not None:
            path = self._path(record.id)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(record.to_json())
            os.replace(tmp, path)

    def delete(self, response_id: str) -> bool:
        found = self._records.pop(response_id, None) is not None
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(response_id).unlink()
        return found

    def prune(self, alive: set[str] | dict) -> None:
        """Drop the records whose saved state the engine no longer holds."""
        for response_id in [i for i in self._records if i not in alive]:
            self.delete(response_id)

    def _path(self, response_id: str) -> Path:
        if not _SAFE_ID.fullmatch(response_id):  # ids are ours; never a path of the client's
            raise ValueError(f"not a response id: {response_id!r}")
        return self.directory / f"{response_id}.json"

    def _load(self) -> None:
        for path in self.directory.glob("resp_*.json"):
            record = self._read(path)
            if record is not None:
                self._records[record.id] = record

    @staticmethod
    def _read(path: Path) -> StoredResponse | None:
        try:
            return StoredResponse.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except Exception:
            logger.warning("ignoring %s: not a stored response", path)
            return None
