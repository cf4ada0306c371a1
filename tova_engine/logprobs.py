"""Log-probabilities of given tokens under logits, with their rank and the top-k."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenLogprobs(NamedTuple):
    """Host-side lists, one entry per row."""

    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def chosen_logprobs(logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [N, V] log-probabilities, targets [N] -> each target's log-probability and its
    rank (1 = the most likely token), as tensors."""
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    return chosen, (logp > chosen.unsqueeze(1)).sum(dim=1) + 1


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> TokenLogprobs:
    """logits [N, V], targets [N] -> each target's log-probability and rank, and the top_k
    alternatives per row, as host lists."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    chosen, ranks = chosen_logprobs(logp, targets)
    top = logp.topk(top_k, dim=-1) if top_k > 0 else None
    return TokenLogprobs(
        chosen.tolist(),
        ranks.tolist(),
        top.indices.tolist() if top is not None else [[] for _ in range(len(targets))],
        top.values.tolist() if top is not None else [[] for _ in range(len(targets))],
    )
