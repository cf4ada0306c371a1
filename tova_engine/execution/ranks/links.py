"""Rank 0's line to each other rank: a pipe that carries pickled messages both ways (plans and
commands out, start-up reports and saved-state shards back).

Plans travel here, not over a collective: a rank that waits for the next plan waits on a
pipe, without the group's timeout (an idle engine would otherwise lose its ranks when it
expired), and the end of rank 0's process closes the pipe, so the rank exits at once
instead of waiting in a collective. Messages are pickled by `dumps`: host tensors travel by
value as their bytes (multiprocessing's pickler would send shared-memory handles, and torch's
own pickling cannot rebuild float8 tensors).
"""

from __future__ import annotations

import io
import pickle
from multiprocessing.connection import Connection

import torch


class RankGone(RuntimeError):
    """A rank's pipe broke: its process ended (rank 0 cannot go on without it)."""


class Link:
    """One end of the pipe between rank 0 and rank `rank` (on either side)."""

    def __init__(self, connection: Connection, rank: int) -> None:
        self.connection = connection
        self.rank = rank

    def send(self, message: object) -> None:
        self.send_pickled(dumps(message))

    def send_pickled(self, data: bytes) -> None:
        self.connection.send_bytes(data)

    def receive(self) -> object:
        """The next message; EOFError once the other end is closed (its process is gone)."""
        return pickle.loads(self.connection.recv_bytes())

    def lost(self, exc: BaseException) -> RankGone:
        return RankGone(f"tensor-parallel rank {self.rank} is gone ({type(exc).__name__}: "
                        f"{exc}); its log says why")

    def close(self) -> None:
        self.connection.close()


class Links:
    """Rank 0's links to ranks 1..N-1, in rank order."""

    def __init__(self, links: list[Link]) -> None:
        self.links = links

    def send(self, message: object) -> None:
        """The same message to every rank, pickled once."""
        data = dumps(message)
        for link in self.links:
            _guarded(link, link.send_pickled, data)

    def send_each(self, messages: list[object]) -> None:
        """messages[i] to rank i + 1."""
        for link, message in zip(self.links, messages, strict=True):
            _guarded(link, link.send, message)

    def receive_all(self) -> list[object]:
        """One message from each rank, rank order."""
        return [_guarded(link, link.receive) for link in self.links]

    def close(self) -> None:
        for link in self.links:
            link.close()


def _guarded(link: Link, call, *args):
    """`call(*args)`, a broken pipe raised as RankGone naming the rank."""
    try:
        return call(*args)
    except (OSError, EOFError) as exc:
        raise link.lost(exc) from exc


def dumps(message: object) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: object):
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                raise TypeError("only host tensors travel between ranks")
            data = obj.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return _tensor, (data, obj.dtype, tuple(obj.shape))
        return NotImplemented


def _tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
