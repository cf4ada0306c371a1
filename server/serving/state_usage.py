"""What the bounded state did to a request, reported in `usage.state_details` (an extension
field: the official `openai` client keeps unknown usage fields, `usage.model_extra`): the
state size the request ran with, and how many tokens its state dropped.

A state of S entries per layer holds the last S tokens it read, by the policy's choice of
which; every global layer holds min(tokens read, S) and has dropped the rest, so the counts
follow from the lengths alone: no engine round trip. A choice's state reads its prompt and
every generated token but the last (no step runs after it). Sliding-window layers (Gemma 3's
local ones) drop more by design; the counts are the global layers'.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.protocol.common import StateDetails


@dataclass(frozen=True, slots=True)
class StateBudget:
    size: int  # the request's state_size (its own, or the server's)
    evicts: bool  # the policy drops entries (`full` never does)

    @classmethod
    def of(cls, requested: int | None, server_size: int, evicts: bool) -> StateBudget:
        return cls(requested or server_size, evicts)

    def dropped(self, tokens_read: int) -> int:
        return max(0, tokens_read - self.size) if self.evicts else 0

    def headers(self, prompt_lengths: list[int]) -> dict[str, str]:
        """What is known before generation, for the response's headers (a stream's too)."""
        return {"X-Tova-State-Size": str(self.size),
                "X-Tova-Prompt-Tokens-Evicted": str(sum(map(self.dropped, prompt_lengths)))}

    def details(self, prompt_lengths: list[int], choices: list[tuple[int, int]]
                ) -> StateDetails:
        """prompt_lengths: each prompt's tokens (once, whatever n); choices: (prompt
        length, generated tokens) of each choice."""
        return StateDetails(
            state_size=self.size,
            prompt_tokens_evicted=sum(self.dropped(n) for n in prompt_lengths),
            tokens_evicted=sum(self.dropped(prompt + max(generated - 1, 0))
                               for prompt, generated in choices),
        )
