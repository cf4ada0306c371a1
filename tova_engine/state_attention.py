"""Attention over the bounded state, with the policy's eviction, in plain PyTorch.

This is the CPU path and the reference the fused GPU kernel is checked against. Each class
is an `Attend` callback for one model forward: it is built by the runner for one step and
called once per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tova_engine.policies import Policy
from tova_engine.state import KVState


def _widen(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax and scores (float64 stays float64 for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class DecodeAttention:
    """One new token for each of B rows (decodes, and prefill chunks of a single token).

    Per layer: write the token at index `num_entries` (the spare entry), attend over the
    valid entries plus itself, score with the policy, and if the row is full move the token
    onto the lowest-scored entry (or leave it to be dropped when it is the lowest itself).
    Static shapes throughout, no host synchronisation.
    """

    def __init__(
        self, state: KVState, policy: Policy, slots: list[int], width: int | None = None
    ) -> None:
        """slots: the rows' slots. width: entries to look at, at least every row's valid
        entries + 1 (the runner knows it from its counters; default the whole buffer)."""
        self.state = state
        self.policy = policy
        device = state.num_seen.device
        self.slots = torch.tensor(slots, dtype=torch.int64, device=device)  # [B]
        # Slots in one run are read through a view instead of a gathered copy.
        first = slots[0]
        contiguous = slots == list(range(first, first + len(slots)))
        self.rows_of_state = slice(first, first + len(slots)) if contiguous else self.slots
        self.width = min(width or state.state_size + 1, state.state_size + 1)
        self.entries = state.num_entries[self.slots]  # [B] valid entries before this token
        self.newest = state.num_seen[self.slots]  # [B] position of this token
        self.capacity = state.capacity[self.slots]
        self.rows = torch.arange(len(slots), device=device)
        entry_index = torch.arange(self.width, device=device)
        self.valid = entry_index.unsqueeze(0) <= self.entries.unsqueeze(1)  # [B, W]
        self.full = self.entries >= self.capacity
        # Per layer: tokens back from the newest that each row's evicted entry was; -1 = none.
        self.evicted_ages: list[torch.Tensor] = []

    @property
    def positions(self) -> torch.Tensor:
        return self.newest

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        k_buf, v_buf = self.state.k[layer], self.state.v[layer]
        k_buf[self.slots, :, self.entries] = k
        v_buf[self.slots, :, self.entries] = v
        self.state.positions[layer, self.slots, self.entries] = self.newest
        rows, width = self.rows_of_state, self.width
        out, attn = self._attend(q, k_buf[rows, :, :width], v_buf[rows, :, :width])
        self._evict(layer, attn, k, v)
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        batch, kv_heads, _, head_dim = keys.shape
        heads = q.shape[1]
        q = q.view(batch, kv_heads, heads // kv_heads, head_dim)  # [B, Hkv, G, D]
        logits = torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(head_dim)  # [B, Hkv, G, E]
        logits = _widen(logits).masked_fill(~self.valid[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)
        out = torch.matmul(probs.to(values.dtype), values)  # [B, Hkv, G, D]
        return out.reshape(batch, heads, head_dim), probs.mean(dim=(1, 2))

    def _evict(self, layer: int, attn: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        state = self.state
        positions = state.positions[layer, self.rows_of_state, : self.width]  # [B, W]
        stats = None
        if state.stats is not None:
            stats = state.stats[layer, self.rows_of_state, : self.width].clone()
            stats[self.rows, self.entries] = 0.0  # the spare entry's leftover from a past token
            stats = stats + attn
        score = self.policy.score(attn, positions, stats, self.newest, self.capacity)
        score = score.masked_fill(~self.valid, float("inf"))
        target = torch.where(self.full, score.argmin(dim=-1), self.entries)
        evicted = positions[self.rows, target]
        self.evicted_ages.append(torch.where(self.full, self.newest - evicted, -1))
        state.k[layer][self.slots, :, target] = k
        state.v[layer][self.slots, :, target] = v
        state.positions[layer, self.slots, target] = self.newest
        if stats is not None:
            stats[self.rows, target] = stats[self.rows, self.entries]
            state.stats[layer, self.rows_of_state, : self.width] = stats

    def finish(self) -> None:
        """Advance the counters once all layers have run."""
        state = self.state
        state.num_entries[self.slots] = torch.minimum(self.entries + 1, self.capacity)
        state.num_seen[self.slots] = self.newest + 1


class ChunkAttention:
    """A prefill chunk of C > 1 tokens of one sequence.

    The chunk attends causally to itself and fully to the state; then, if more than the
    row's capacity would remain, the entries with the highest policy score for the chunk's
    last query are kept (C = whole prompt is the reference TOVA prefill).
    """

    def __init__(
        self, state: KVState, policy: Policy, slot: int, entries: int, start: int, length: int
    ) -> None:
        self.state = state
        self.policy = policy
        self.slot = slot
        self.entries = entries
        self.start = start
        self.length = length
        self.capacity = int(state.capacity[slot])
        device = state.num_seen.device
        self.chunk_positions = torch.arange(start, start + length, device=device)
        self.evicted_ages: list[torch.Tensor] = []

    @property
    def positions(self) -> torch.Tensor:
        return self.chunk_positions

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        n, slot = self.entries, self.slot
        state = self.state
        keys = torch.cat((state.k[layer][slot, :, :n], k.transpose(0, 1)), dim=1)  # [Hkv, n+C, D]
        values = torch.cat((state.v[layer][slot, :, :n], v.transpose(0, 1)), dim=1)
        group = q.shape[1] // keys.shape[0]
        keys_q = keys.repeat_interleave(group, dim=0)  # [H, n+C, D]
        values_q = values.repeat_interleave(group, dim=0)
        queries = q.transpose(0, 1)  # [H, C, D]
        mask = self._mask(queries.device)
        out = F.scaled_dot_product_attention(queries, keys_q, values_q, attn_mask=mask)
        self._keep(layer, queries, keys_q, keys, values, mask)
        return out.transpose(0, 1)

    def _mask(self, device: torch.device) -> torch.Tensor:
        """[C, n+C] bool: every state entry, and the chunk causally."""
        chunk = torch.ones(self.length, self.length, dtype=torch.bool, device=device).tril()
        past = torch.ones(self.length, self.entries, dtype=torch.bool, device=device)
        return torch.cat((past, chunk), dim=1)

    def _probs(self, queries, keys_q, mask) -> torch.Tensor:
        """Head-averaged attention probabilities of the given queries: [C', n+C]."""
        logits = torch.matmul(queries, keys_q.transpose(-1, -2)) / math.sqrt(queries.shape[-1])
        logits = _widen(logits).masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1).mean(dim=0)

    def _keep(self, layer, queries, keys_q, keys, values, mask) -> None:
        state, slot = self.state, self.slot
        total = self.entries + self.length
        positions = torch.cat((state.positions[layer, slot, : self.entries], self.chunk_positions))
        stats = None
        if state.stats is not None:
            # Accumulated attention needs every chunk query, not just the last one.
            received = self._probs(queries, keys_q, mask).sum(dim=0)  # [n+C]
            fresh = received.new_zeros(self.length)
            stats = torch.cat((state.stats[layer, slot, : self.entries], fresh)) + received
        if total <= self.capacity:
            keep = torch.arange(total, device=keys.device)
        else:
            last = self._probs(queries[:, -1:], keys_q, mask[-1:]).squeeze(0)
            newest = self.chunk_positions[-1:]
            score = self.policy.score(
                last[None],
                positions[None],
                None if stats is None else stats[None],
                newest,
                torch.tensor([self.capacity], device=keys.device),
            )[0]
            keep = score.topk(self.capacity).indices.sort().values
            dropped = torch.ones(total, dtype=torch.bool, device=keys.device)
            dropped[keep] = False
            self.evicted_ages.append(self.chunk_positions[-1] - positions[dropped])
        count = keep.shape[0]
        state.k[layer][slot, :, :count] = keys[:, keep]
        state.v[layer][slot, :, :count] = values[:, keep]
        state.positions[layer, slot, :count] = positions[keep]
        if stats is not None:
            state.stats[layer, slot, :count] = stats[keep]

    def finish(self) -> None:
        state, slot = self.state, self.slot
        state.num_entries[slot] = min(self.entries + self.length, self.capacity)
        state.num_seen[slot] = self.start + self.length
