"""The runner's log-prob lists turned into the {token id: Logprob} entries callers receive."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tova_engine.execution.logprobs import TokenLogprobs
from tova_engine.outputs import Logprob, PositionLogprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class LogprobBuilder:
    """Turns the runner's host lists into the {token id: Logprob} dicts callers receive."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer

    def position(
        self, token: int, logprob: float, rank: int, top_ids: list[int], top_logprobs: list[float]
    ) -> PositionLogprobs:
        """The chosen token first, then the top alternatives."""
        entry: PositionLogprobs = {token: Logprob(logprob, rank, self._decode(token))}
        for alt_rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs, strict=True), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, alt_rank, self._decode(tid))
        return entry

    def prompt_positions(
        self, prompt_token_ids: list[int], first: int, values: TokenLogprobs
    ) -> list[PositionLogprobs]:
        """Entries for prompt tokens `first`, `first + 1`, ... as the runner computed them."""
        targets = prompt_token_ids[first : first + len(values.logprobs)]
        return [
            self.position(
                token,
                values.logprobs[i],
                values.ranks[i],
                values.top_ids[i],
                values.top_logprobs[i],
            )
            for i, token in enumerate(targets)
        ]

    def _decode(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])
