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


class TokenLogprobTensors(NamedTuple):
    """The same on the device, for reading back with the rest of a step's outputs."""

    logprobs: torch.Tensor  # [N]
    ranks: torch.Tensor  # [N] int64
    top_ids: torch.Tensor | None  # [N, k]; None when k = 0
    top_logprobs: torch.Tensor | None

    def to_lists(self, host: list[torch.Tensor]) -> TokenLogprobs:
        """`host`: CPU copies of the non-None fields, in order."""
        rows = len(host[0])
        if self.top_ids is None:
            empty = [[] for _ in range(rows)]
            return TokenLogprobs(host[0].tolist(), host[1].tolist(), empty, [[] for _ in empty])
        return TokenLogprobs(*(t.tolist() for t in host))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self if t is not None]


def token_logprob_tensors(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int
) -> TokenLogprobTensors:
    """logits [N, V], targets [N] -> each target's log-probability and rank, and the top_k
    alternatives per row, as device tensors."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    chosen, ranks = chosen_logprobs(logp, targets)
    top = logp.topk(top_k, dim=-1) if top_k > 0 else None
    if top is None:
        return TokenLogprobTensors(chosen, ranks, None, None)
    return TokenLogprobTensors(chosen, ranks, top.indices, top.values)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> TokenLogprobs:
    """As `token_logprob_tensors`, as host lists."""
    values = token_logprob_tensors(logits, targets, top_k)
    return values.to_lists([t.cpu() for t in values.tensors()])
