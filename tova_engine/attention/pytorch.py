"""Attention over the bounded state, with the policy's eviction, in plain PyTorch.

This is the CPU path and the reference the fused GPU kernel is checked against. Each class
is an `AttentionBackend` (backend.py: the contract) for one model forward: built by
the runner for one step and called once per layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tova_engine.attention.backend import AttentionBackend, DecodeRows, KindRows, layer_kinds
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy
from tova_engine.transfer import to_device


def _widen(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax and scores (float64 stays float64 for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _View(NamedTuple):
    """A layer kind's rows (`KindRows`) as the PyTorch step reads them."""

    rows: KindRows
    valid: torch.Tensor  # [B, W] entries attended: the valid ones and the new token
    full: torch.Tensor  # [B] the token replaces an entry
    width: int  # W
    recent: torch.Tensor  # [B] latest positions protected


class DecodeAttention(DecodeRows):
    """One new token for each of B rows (decodes, and prefill chunks of a single token).

    Per layer: write the token at index `num_entries` (the spare entry), attend over the
    valid entries plus itself, score with the policy, and if the row is full move the token
    onto the lowest-scored entry (or leave it to be dropped when it is the lowest itself).
    A sliding-window layer does the same within its own size, dropping the oldest.
    Static shapes throughout, no host synchronisation.
    """

    def __init__(
        self, state: KVState, policy: Policy, slots: list[int], width: int | None = None
    ) -> None:
        """slots: the rows' slots. width: entries to look at, at least every row's valid
        entries + 1 (the runner knows it from its counters; default the whole buffer)."""
        device = state.num_seen.device
        super().__init__(state, policy, to_device(slots, torch.int64, device))
        # Slots in one run are read through a view instead of a gathered copy.
        first = slots[0]
        contiguous = slots == list(range(first, first + len(slots)))
        self.rows_of_state = slice(first, first + len(slots)) if contiguous else self.slots
        self.width = min(width or state.state_size + 1, state.state_size + 1)
        self.rows = torch.arange(len(slots), device=device)
        self._views = {local: self._view(rows, local) for local, rows in self.kinds.items()}
        # Per layer: tokens back from the newest that each row's evicted entry was; -1 = none.
        self._ages: list[torch.Tensor] = []

    def _view(self, rows: KindRows, local: bool) -> _View:
        width = min(self.width, self.state.local_size + 1) if local else self.width
        entry_index = torch.arange(width, device=rows.entries.device)
        valid = entry_index.unsqueeze(0) <= rows.entries.unsqueeze(1)  # [B, W]
        recent = rows.kind.recent[self.slots]
        return _View(rows, valid, rows.entries >= rows.capacity, width, recent)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        view = self._views[self.state.is_local(layer)]
        k_buf, v_buf = self.state.k[layer], self.state.v[layer]
        entries = view.rows.entries
        k_buf[self.slots, :, entries] = k
        v_buf[self.slots, :, entries] = v
        self.state.positions[layer, self.slots, entries] = self.newest
        rows, width = self.rows_of_state, view.width
        keys, values = k_buf[rows, :, :width], v_buf[rows, :, :width]
        if self.state.fp8:  # (dequantized copies) the new token as computed, as the kernel
            keys[self.rows, :, entries] = k
            values[self.rows, :, entries] = v
        out, attn = self._attend(view, q, keys, values)
        self._evict(layer, view, attn, k, v)
        return out

    def _attend(self, view: _View, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        batch, kv_heads, _, head_dim = keys.shape
        heads = q.shape[1]
        q = q.view(batch, kv_heads, heads // kv_heads, head_dim)  # [B, Hkv, G, D]
        scalar = self.state.attention_scalar
        logits = torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(scalar)  # [B, Hkv, G, E]
        logits = _widen(logits).masked_fill(~view.valid[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)
        out = torch.matmul(probs.to(values.dtype), values)  # [B, Hkv, G, D]
        return out.reshape(batch, heads, head_dim), self.state.head_mean(probs.sum(dim=(1, 2)))

    def _evict(self, layer: int, view: _View, attn, k: torch.Tensor, v: torch.Tensor) -> None:
        state, rows, width = self.state, self.rows_of_state, view.width
        policy, entries = view.rows.kind.policy, view.rows.entries
        positions = state.positions[layer, rows, :width]  # [B, W]
        stats = None
        if state.stats is not None and policy.uses_stats:
            stats = state.stats[layer, rows, :width].clone()
            stats[self.rows, entries] = 0.0  # the spare entry's leftover from a past token
            stats = stats + attn
        score = policy.scores(attn, positions, stats, self.newest, view.recent)
        score = score.masked_fill(~view.valid, float("inf"))
        target = torch.where(view.full, score.argmin(dim=-1), entries)
        evicted = positions[self.rows, target]
        self._ages.append(torch.where(view.full, self.newest - evicted, -1))
        state.k[layer][self.slots, :, target] = k
        state.v[layer][self.slots, :, target] = v
        state.positions[layer, self.slots, target] = self.newest
        if stats is not None:
            stats[self.rows, target] = stats[self.rows, entries]
            state.stats[layer, rows, :width] = stats

    @property
    def evicted_ages(self) -> torch.Tensor | None:
        """[layers, B]."""
        return torch.stack(self._ages) if self._ages else None


class ChunkAttention(AttentionBackend):
    """Prefill chunks of C > 1 tokens for R sequences at the same point of their prompts
    (same start, length and capacity), in one batched forward.

    Each row's chunk attends causally to itself and fully to the row's state; then, if more
    than the capacity would remain, each row keeps the entries with the highest policy score
    for its chunk's last query (C = whole prompt is the reference TOVA prefill). In a
    sliding-window layer a query sees only the positions within its window, and the layer
    keeps the latest entries its size holds.
    """

    def __init__(
        self,
        state: KVState,
        policy: Policy,
        slots: list[int] | torch.Tensor,
        entries: int,
        start: int | torch.Tensor,
        length: int,
        capacity: int,
    ) -> None:
        """slots: the rows' slots, a list or a device tensor (a captured graph's input);
        entries: valid entries every global layer of a row holds before the chunk; start: the
        chunk's first position, an int or a [1] device tensor (a captured graph's input: no
        kernel's shape depends on it); capacity: the rows' state size, as the host knows it
        (reading it back would be a host-device sync)."""
        self.state = state
        device = state.num_seen.device
        self.num_rows = len(slots)
        if isinstance(slots, torch.Tensor):
            self.slots = self.rows = slots  # [R]
        else:
            self.slots = to_device(slots, torch.int64, device)  # [R]
            # One row reads its slot through a view; several are gathered.
            self.rows = slots[0] if len(slots) == 1 else self.slots
        self.entries = entries
        self.length = length
        self.capacity = capacity
        self.kinds = layer_kinds(state, policy)
        self.chunk_positions = torch.arange(length, device=device) + start  # [C]
        self._masks: dict[int, torch.Tensor] = {}
        # Imported here: the module pulls in torch._dynamo (over a second at every process
        # start, front ends included), and only a chunk's attention needs it.
        from torch.nn.attention.bias import causal_lower_right

        self._causal_bias = causal_lower_right(length, entries + length)
        # Per layer that evicted: [R, entries + C], tokens back from the chunk's last position
        # of each dropped entry, -1 for kept ones (fixed size: no host sync to filter).
        self._ages: list[torch.Tensor] = []

    @property
    def positions(self) -> torch.Tensor:
        return self.chunk_positions.repeat(self.num_rows)  # [R*C], row after row

    def _past(self, buffer, count: int) -> torch.Tensor:
        """The rows' first `count` entries, read where `_write` writes them: buffer [slots,
        S+1] (positions, statistics) -> [R, count]; K/V [slots, Hkv, S+1, D] (a tensor, or a
        float8 `Fp8KV` read dequantized) -> [R, Hkv, count, D]."""
        entries = (slice(None), slice(count)) if len(buffer.shape) == 4 else (slice(count),)
        past = buffer[(self.rows, *entries)]
        return past.unsqueeze(0) if isinstance(self.rows, int) else past

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        rows, length = self.num_rows, self.length
        state = self.state
        local = state.is_local(layer)
        n = state.layer_entries(layer, self.entries)
        q = q.view(rows, length, *q.shape[1:])  # [R, C, H, D]
        k = k.view(rows, length, *k.shape[1:])  # [R, C, Hkv, D]
        v = v.view(rows, length, *v.shape[1:])
        past_k = self._past(state.k[layer], n)  # [R, Hkv, n, D]
        past_v = self._past(state.v[layer], n)
        keys = torch.cat((past_k, k.transpose(1, 2)), dim=2)  # [R, Hkv, n+C, D]
        values = torch.cat((past_v, v.transpose(1, 2)), dim=2)
        queries = q.transpose(1, 2)  # [R, H, C, D]
        mask = self._window_mask(layer, n) if local else self._mask(n, queries.device)
        # On CUDA the same mask as a lower-right causal bias: SDPA can take its flash kernel.
        # Grouped-query heads share their K/V inside SDPA: no per-head copies of the state.
        bias = self._causal_bias if queries.is_cuda and not local else mask
        gqa = queries.shape[1] != keys.shape[1]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=bias, enable_gqa=gqa, scale=self._scale
        )
        self._keep(layer, n, queries, keys, values, mask)
        return out.transpose(1, 2).reshape(rows * length, out.shape[1], out.shape[-1])

    @property
    def _scale(self) -> float:
        return 1.0 / math.sqrt(self.state.attention_scalar)

    def _mask(self, n: int, device: torch.device) -> torch.Tensor:
        """[C, n+C] bool: every state entry, and the chunk causally. The same for every
        global layer: built on first use (a step's host time is mostly kernel launches)."""
        if n not in self._masks:
            chunk = torch.ones(self.length, self.length, dtype=torch.bool, device=device).tril()
            past = torch.ones(self.length, n, dtype=torch.bool, device=device)
            self._masks[n] = torch.cat((past, chunk), dim=1)
        return self._masks[n]

    def _window_mask(self, layer: int, n: int) -> torch.Tensor:
        """[R, 1, C, n+C] bool for a sliding layer: query at p sees keys at (p - window, p].
        Read from each row's positions: its entries' order is the order they were written."""
        past = self._past(self.state.positions[layer], n)  # [R, n]
        keys = torch.cat((past, self.chunk_positions.expand(self.num_rows, -1)), dim=1)
        query = self.chunk_positions[None, :, None]  # [1, C, 1]
        keys = keys[:, None, :]  # [R, 1, n+C]
        seen = (keys <= query) & (keys > query - self.state.sliding_window)
        return seen.unsqueeze(1)

    def _probs(self, queries, keys, mask) -> torch.Tensor:
        """Head-averaged attention probabilities of the given queries: [R, C', n+C].

        queries [R, H, C', D], keys [R, Hkv, n+C, D]: query head h reads kv head h // G, so
        the G heads of a kv head are one matmul against it (no repeated keys). mask: [C', n+C]
        or [R, 1, C', n+C]."""
        rows, heads, count, dim = queries.shape
        kv_heads, total = keys.shape[1], keys.shape[2]
        grouped = queries.reshape(rows, kv_heads, heads // kv_heads * count, dim)
        scalar = self.state.attention_scalar
        logits = torch.matmul(grouped, keys.transpose(-1, -2)) / math.sqrt(scalar)
        logits = _widen(logits.view(rows, heads, count, total)).masked_fill(~mask, float("-inf"))
        return self.state.head_mean(logits.softmax(dim=-1).sum(dim=1))

    def _keep(self, layer, n, queries, keys, values, mask) -> None:
        state, rows = self.state, self.num_rows
        kind = self.kinds[state.is_local(layer)]
        policy = kind.policy
        capacity = state.layer_entries(layer, self.capacity)
        total = n + self.length
        chunk_positions = self.chunk_positions.expand(rows, self.length)
        positions = torch.cat((self._past(state.positions[layer], n), chunk_positions), dim=1)
        stats = None
        if state.stats is not None and policy.uses_stats:
            # Accumulated attention needs every chunk query, not just the last one.
            received = self._probs(queries, keys, mask).sum(dim=1)  # [R, n+C]
            fresh = received.new_zeros(rows, self.length)
            stats = torch.cat((self._past(state.stats[layer], n), fresh), dim=1) + received
        if total <= capacity:
            # Everything stays, in order: written as is, no gathers.
            self._write(state.k[layer], keys, total)
            self._write(state.v[layer], values, total)
            self._write(state.positions[layer], positions, total)
            if stats is not None:
                self._write(state.stats[layer], stats, total)
            return
        last = None
        if policy.uses_attention:
            last = self._probs(queries[:, :, -1:], keys, mask[..., -1:, :]).squeeze(1)  # [R, n+C]
        newest = self.chunk_positions[-1:].expand(rows)
        recent = kind.recent[self.slots]
        score = policy.scores(last, positions, stats, newest, recent)
        # Unsorted top-k (one radix sort less on CUDA), then the kept indices in entry order.
        keep = score.topk(capacity, dim=-1, sorted=False).indices.sort(dim=-1).values  # [R, S]
        dropped = torch.ones(rows, total, dtype=torch.bool, device=keys.device)
        dropped.scatter_(1, keep, False)
        ages = torch.where(dropped, newest[:, None] - positions, -1)
        # Left-padded to the global layers' width: every layer's ages stack into one tensor.
        self._ages.append(F.pad(ages, (self.entries + self.length - total, 0), value=-1))
        count = keep.shape[1]
        entry_index = keep[:, None, :, None].expand(rows, keys.shape[1], count, keys.shape[-1])
        self._write(state.k[layer], keys.gather(2, entry_index), count)
        self._write(state.v[layer], values.gather(2, entry_index), count)
        self._write(state.positions[layer], positions.gather(1, keep), count)
        if stats is not None:
            self._write(state.stats[layer], stats.gather(1, keep), count)

    def _write(self, buffer: torch.Tensor, kept: torch.Tensor, count: int) -> None:
        """buffer [slots, ..., S+1, ...] (entries on dim 2 for K/V, 1 for positions/stats)
        <- kept [R, ..., count, ...] at entries [0, count)."""
        if len(buffer.shape) == 4:  # (K/V: a tensor or a float8 Fp8KV)
            buffer[self.slots, :, :count] = kept
        else:
            buffer[self.slots, :count] = kept

    def finish(self) -> None:
        state = self.state
        state.num_entries.index_fill_(0, self.slots, min(self.entries + self.length, self.capacity))
        seen = self.chunk_positions[-1:] + 1  # start + length, without reading start back
        state.num_seen[self.slots] = seen.expand(self.num_rows)

    @property
    def evicted_ages(self) -> torch.Tensor | None:
        """[layers that evicted, R, entries + C]; None when none did."""
        return torch.stack(self._ages) if self._ages else None
