"""Eviction policies, each declared once as data that every attention path reads.

A full row gives up one entry for the incoming token: the one with the lowest score among the
unprotected ones. A policy says
  * what scores an entry (`score`): `"attention"`, the newest query's attention averaged over
    the layer's query heads (TOVA); `"accumulated"`, that attention summed over every query
    so far, a per-entry statistic the state keeps (H2O); or `"position"`, older first;
  * which entries are never evicted: the first `protect_first` positions (attention sinks)
    and the latest `protect_recent` positions, a count or a fraction of the row's state size.
The PyTorch decode path and the chunked-prefill path (`attention/pytorch.py`) call `scores`;
the Triton kernel (`kernels/decode_attention.py`) implements the same primitives from the
declaration's fields (`score` as its SCORE_CODES, `protect_first`, and each slot's
`KVState.protect_recent`), so a policy declared here, a built-in or a user's, runs on all three.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tova_engine.errors import InvalidRequestError

SCORES = ("attention", "accumulated", "position")


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    score: str = "attention"
    protect_first: int = 0
    # A count (int >= 0) or a fraction of the row's state size (float in [0, 1]).
    protect_recent: int | float = 0
    evicts: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a policy needs a name")
        if self.score not in SCORES:
            raise ValueError(f"policy score must be one of {', '.join(SCORES)}; "
                             f"got {self.score!r}")
        if not isinstance(self.protect_first, int) or self.protect_first < 0:
            raise ValueError(f"protect_first must be an integer >= 0; got {self.protect_first!r}")
        check_protect_recent(self.protect_recent, ValueError)

    @property
    def uses_stats(self) -> bool:
        return self.score == "accumulated"

    @property
    def uses_attention(self) -> bool:
        return self.score != "position"

    @property
    def protects_recent(self) -> bool:
        """Whether a request's own `protect_recent` means anything: the policy evicts, and by
        a score that does not already keep the latest tokens."""
        return self.evicts and self.score != "position"

    def with_protect_recent(self, value: int | float | None) -> Policy:
        """The same policy with another recency protection (None keeps its own)."""
        if value is None:
            return self
        check_request_protect_recent(value, self.name, self.evicts, self.protects_recent)
        return dataclasses.replace(self, protect_recent=value)

    def recent_count(self, capacity: int) -> int:
        """The latest positions a row of `capacity` entries never evicts (at most all)."""
        value = self.protect_recent
        count = math.floor(value * capacity) if isinstance(value, float) else value
        return min(count, capacity)

    def scores(
        self,
        attn: torch.Tensor | None,
        positions: torch.Tensor,
        stats: torch.Tensor | None,
        newest: torch.Tensor,
        recent: torch.Tensor,
    ) -> torch.Tensor:
        """Keep-scores (higher keeps; protected entries +inf) for one layer of B rows.

        attn      [B, E] float: the newest query's attention per entry, averaged over all the
                  layer's query heads (None when the policy scores by position).
        positions [B, E] int64: the absolute position each entry holds.
        stats     [B, E] float or None: the accumulated attention, updated for this step.
        newest    [B] int64: the newest token's position.
        recent    [B] int64: each row's `recent_count`.
        """
        if self.score == "attention":
            score = attn
        elif self.score == "accumulated":
            assert stats is not None  # the state keeps them for such policies
            score = stats
        else:
            score = positions.to(torch.float32)
        protected = positions > (newest - recent).unsqueeze(-1)
        if self.protect_first:
            protected |= positions < self.protect_first
        return score.masked_fill(protected, float("inf"))


def check_protect_recent(value: object, error) -> None:
    """A count (int >= 0) or a fraction (float in [0, 1]); `error(message)` is raised."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"protect_recent must be a count (int) or a fraction of the state size "
                    f"(float); got {value!r}")
    if isinstance(value, int) and value < 0:
        raise error(f"protect_recent must be >= 0; got {value}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise error(f"protect_recent as a fraction must be in [0, 1]; got {value}")


def check_request_protect_recent(
    value: object, policy: str, evicts: bool, protects_recent: bool
) -> None:
    """A request's own protect_recent, refused naming the parameter where it is malformed or
    the policy has no use for it. The one rule: the front end applies it from `EngineInfo`
    before a request reaches the core, `Policy.with_protect_recent` where a policy is built."""
    if not protects_recent:
        raise InvalidRequestError(
            "protect_recent",
            f"protect_recent has no use for policy {policy!r}: it "
            + ("never evicts" if not evicts else "already keeps the latest tokens"),
        )
    check_protect_recent(value, lambda message: InvalidRequestError("protect_recent", message))


NUM_SINK_TOKENS = 4
POLICIES: dict[str, Policy] = {
    policy.name: policy for policy in (
        # Token Omission Via Attention: drop the entry the newest query attends to least,
        # never one of the latest half of the state. The half was chosen on evidence
        # (docs/quality.md: best perplexity at every S on two novels, passkey retrieval
        # unchanged); protect_recent=0 is exactly the paper's TOVA.
        Policy("tova", score="attention", protect_recent=0.5),
        # Heavy-Hitter Oracle: half the state for the latest tokens, the rest for the largest
        # accumulated attention.
        Policy("h2o", score="accumulated", protect_recent=0.5),
        # StreamingLLM: the first four tokens (attention sinks) and a window of the latest.
        Policy("sink", score="position", protect_first=NUM_SINK_TOKENS),
        # The latest tokens: drop the oldest.
        Policy("window", score="position"),
        # No eviction: requests that would overflow the state are refused at admission.
        Policy("full", score="position", evicts=False),
    )
}


# What a sliding-window layer's state runs (Gemma 3's local layers), whatever the engine's
# policy: it never needs more than its window, so it keeps the latest.
SLIDING_LAYER_POLICY = POLICIES["window"]


def make_policy(policy: str | Policy, protect_recent: int | float | None = None) -> Policy:
    """A built-in policy by name, or a declared one as it is; `protect_recent` overrides its
    recency protection."""
    if isinstance(policy, Policy):
        resolved = policy
    elif policy in POLICIES:
        resolved = POLICIES[policy]
    else:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)} or a Policy; "
                         f"got {policy!r}")
    return resolved.with_protect_recent(protect_recent)
