"""Cached prompt-prefix states: a prompt that starts with a prefix another prompt already
prefilled restores that prefix's state instead of computing it again, exactly.

Prompts are prefilled in chunks on a fixed grid from token 0 (`prefill_chunk_size`; the
scheduler keeps chunks whole and on it), so the state after the first k grid blocks depends
only on those tokens and on what shapes the state: the engine's model, dtype, policy and
state_size (one cache per engine, emptied with it) and the request's own capacity and
protect_recent (in the key). Such a state is saved at block boundaries while a prompt
prefills, into one of the state's cache rows (`KVState.cache_rows`, device copies queued
behind the chunk), and restored into a request's slot, when its first chunk is scheduled,
for the longest cached block prefix that leaves at least one prompt token to run (its
logits are what the first token is sampled from). Outputs, log-probs and retained positions
are those of a cold prefill.

Looking up when the first chunk runs, not at admission, lets the prompts admitted together
share: those behind the first in the token budget find what it saved. A row saved in the
step being scheduled is not found until the next one (restores run before the step's
forward, saves after it); steps run in order on the device, so a row found was written.

A block is `prefill_chunk_size` tokens, or a multiple of it of at least MIN_BLOCK_TOKENS (a
state is a whole row: saving one every token would cost more than it saves). Keys chain
SHA-256 over the blocks' token ids: the same key means the same tokens up to a 2**-128
chance, far below any hardware error rate. The index lives on the host, in the scheduler's
hands; the least recently used row is reused when none is free, so a full cache never
refuses a request.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from typing import NamedTuple

from tova_engine.step.request import Request

MIN_BLOCK_TOKENS = 64


class PrefixHit(NamedTuple):
    tokens: int  # prompt tokens the restored state has read
    row: int  # the state row it lies in


class PrefixCache:
    def __init__(self, rows: range | list[int], prefill_chunk_size: int) -> None:
        self.block_tokens = prefill_chunk_size * math.ceil(MIN_BLOCK_TOKENS / prefill_chunk_size)
        self.num_rows = len(rows)
        self._free = list(reversed(rows))
        self._rows: OrderedDict[bytes, int] = OrderedDict()  # key -> row, least recent first
        self._keys: dict[int, bytes] = {}  # row -> key
        self._block_keys: dict[str, list[bytes]] = {}  # request id -> its blocks' keys
        self._fresh: set[int] = set()  # rows saved in the step being scheduled

    @property
    def enabled(self) -> bool:
        return self.num_rows > 0

    @property
    def rows_used(self) -> int:
        return len(self._keys)

    @staticmethod
    def caches(request: Request) -> bool:
        """A continued conversation's state starts from its snapshot, not from token 0."""
        return request.position_offset == 0 and request.resume is None

    @classmethod
    def looks_up(cls, request: Request) -> bool:
        """Whether a prompt's first chunk looks the cache up: a request that wants prompt
        log-probs runs its whole prompt."""
        return request.params.prompt_logprobs is None and cls.caches(request)

    def new_step(self) -> None:
        """The rows saved while the previous step was scheduled are written before any later
        step's restores run."""
        self._fresh.clear()

    def lookup(self, request: Request) -> PrefixHit | None:
        """The longest cached block prefix of the prompt that leaves a token to run."""
        if not self.looks_up(request):
            return None
        keys = self._keys_of(request)
        usable = (request.prompt_len - 1) // self.block_tokens
        for blocks in range(min(usable, len(keys)), 0, -1):
            row = self._rows.get(keys[blocks - 1])
            if row is not None and row not in self._fresh:
                self._rows.move_to_end(keys[blocks - 1])
                return PrefixHit(blocks * self.block_tokens, row)
        return None

    def save_row(self, request: Request, end: int) -> int | None:
        """The row to save the prompt's state into once it has read `end` tokens, when that is
        a block boundary not cached yet; the least recently used row is taken over when none
        is free."""
        if end % self.block_tokens or not self.caches(request):
            return None
        key = self._keys_of(request)[end // self.block_tokens - 1]
        if key in self._rows:
            self._rows.move_to_end(key)
            return None
        if self._free:
            row = self._free.pop()
        else:
            _, row = self._rows.popitem(last=False)
            del self._keys[row]
        self._rows[key] = row
        self._keys[row] = key
        self._fresh.add(row)
        return row

    def forget(self, rows: list[int]) -> None:
        """Rows whose save did not happen (its step failed): their content is not the key's."""
        for row in rows:
            key = self._keys.pop(row, None)
            if key is not None:
                del self._rows[key]
                self._free.append(row)
                self._fresh.discard(row)

    def release(self, request_id: str) -> None:
        self._block_keys.pop(request_id, None)

    def _keys_of(self, request: Request) -> list[bytes]:
        keys = self._block_keys.get(request.request_id)
        if keys is None:
            keys = self._block_keys[request.request_id] = _chain(request, self.block_tokens)
        return keys


def _chain(request: Request, block: int) -> list[bytes]:
    """One key per whole block of the prompt, each naming every token before its end and what
    shapes the state beyond the engine's own configuration."""
    digest = hashlib.sha256(
        repr((request.capacity, request.params.protect_recent, block)).encode()
    ).digest()
    tokens = request.prompt_token_ids
    keys = []
    for start in range(0, len(tokens) - block + 1, block):
        block_ids = array("q", tokens[start : start + block]).tobytes()
        digest = hashlib.sha256(digest + block_ids).digest()
        keys.append(digest)
    return keys
