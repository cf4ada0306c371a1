"""Eviction policies: which state entry a full row gives up for the incoming token.

A policy turns one step's attention into a keep-score per entry; the engine overwrites the
entry with the lowest score (which may be the incoming token itself). All tensors are for one
layer and a batch of rows; entries beyond a row's valid count are masked by the caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

NUM_SINK_TOKENS = 4


class Policy(ABC):
    """Scores state entries; the lowest score is evicted.

    Contract of `score`:
      attn      [B, E] float32: attention probability of the newest query on each entry,
                averaged over all query heads of the layer (GQA included).
      positions [B, E] int64: absolute position of the token each entry holds.
      stats     [B, E] float32 or None: the running statistic kept by policies with
                `uses_stats` (accumulated attention for H2O), already updated for this step.
      newest    [B] int64: position of the newest token.
      capacity  [B] int64: the row's state size.
    Returns [B, E] scores; higher means keep.
    """

    name: str = ""
    uses_stats: bool = False
    evicts: bool = True

    @abstractmethod
    def score(
        self,
        attn: torch.Tensor,
        positions: torch.Tensor,
        stats: torch.Tensor | None,
        newest: torch.Tensor,
        capacity: torch.Tensor,
    ) -> torch.Tensor: ...


class TovaPolicy(Policy):
    """Token Omission Via Attention: drop the entry the newest query attends to least."""

    name = "tova"

    def score(self, attn, positions, stats, newest, capacity):
        return attn


class WindowPolicy(Policy):
    """Keep the most recent tokens: drop the oldest."""

    name = "window"

    def score(self, attn, positions, stats, newest, capacity):
        return positions.to(torch.float32)


class SinkPolicy(Policy):
    """StreamingLLM: the first four tokens (attention sinks) plus a window of the latest."""

    name = "sink"

    def score(self, attn, positions, stats, newest, capacity):
        score = positions.to(torch.float32)
        return score.masked_fill(positions < NUM_SINK_TOKENS, float("inf"))


class H2OPolicy(Policy):
    """Heavy-Hitter Oracle: half the state for the most recent tokens, the other half for
    the tokens with the largest attention accumulated over all queries so far."""

    name = "h2o"
    uses_stats = True

    def score(self, attn, positions, stats, newest, capacity):
        assert stats is not None  # guaranteed by uses_stats; not user input
        recent_window = (capacity // 2).unsqueeze(-1)
        recent = positions > newest.unsqueeze(-1) - recent_window
        return stats.masked_fill(recent, float("inf"))


class FullPolicy(Policy):
    """No eviction: the state size caps the context; requests that would overflow it are
    refused at admission, so `score` is never consulted."""

    name = "full"
    evicts = False

    def score(self, attn, positions, stats, newest, capacity):
        return positions.to(torch.float32)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (TovaPolicy, H2OPolicy, SinkPolicy, WindowPolicy, FullPolicy)
}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name]()
