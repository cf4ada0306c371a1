"""A request as the front end hands it to the core (`CoreRequest`), and the core's request and
sequence bookkeeping: counters and token lists, never tensors.

A request with n choices is one `Request` holding n `Sequence`s. The prompt is prefilled once,
in the first sequence's slot; the state is then copied to the other choices' slots so each
samples its own continuation. Text, logprob dicts and outputs for callers are the front
end's (`frontend/output_processor.py`); the core knows token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tova_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from tova_engine.state.snapshots import StateSnapshot


@dataclass(slots=True, frozen=True)
class CoreRequest:
    """A request the front end has validated: prompt ids and resolved limits."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    capacity: int  # this request's state size (at most the engine's)
    max_tokens: int  # resolved output limit
    # Continue from this stored state (its pending tokens are fed before the prompt).
    resume_key: str | None = None


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    index: int
    generator: torch.Generator | None
    slot: int = -1
    # Tokens the host has received; it can lag `num_sampled` by the step in flight.
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens sampled for this choice, the one of a launched step not yet read back included.
    num_sampled: int = 0
    finish_reason: str | None = None
    stop_reason: int | None = None
    # Whether the core has told the front end this choice finished.
    reported: bool = False
    # The structured-output matcher (llguidance's), advanced by every token the host reads.
    grammar: Any = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # This request's state size (at most the engine's).
    capacity: int
    # Resolved output limit (SamplingParams.max_tokens, or what the length limit leaves).
    max_tokens: int
    # What the request was built from: another tensor-parallel rank builds its copy from it.
    core: CoreRequest
    sequences: list[Sequence] = field(default_factory=list)
    # Prompt tokens already run through the model (in the first sequence's slot).
    num_computed: int = 0
    error: str | None = None
    # A continued conversation: the state its slot starts from, and the tokens that state
    # has read (the prompt's first token goes at this position).
    resume: StateSnapshot | None = None
    position_offset: int = 0
    # Prompt tokens whose state was restored from the prefix cache (core/prefix_cache.py)
    # instead of prefilled; looked up when its first chunk is scheduled.
    cached_tokens: int = 0
    prefix_looked_up: bool = False
    # Every chunk so far whole and on the prefill grid: the state at a block boundary is the
    # one any prompt with these tokens reaches, so it may be cached.
    on_grid: bool = True

    @classmethod
    def of(cls, core: CoreRequest, generators: list[torch.Generator | None]) -> Request:
        request = cls(
            core.request_id, core.prompt_token_ids, core.params, core.capacity, core.max_tokens,
            core,
        )
        request.sequences = [Sequence(request, i, g) for i, g in enumerate(generators)]
        return request

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def continue_from(self, snapshot: StateSnapshot) -> None:
        """Start from `snapshot`: its pending tokens are fed first, then the prompt."""
        self.resume = snapshot
        self.position_offset = snapshot.num_seen
        self.prompt_token_ids = [*snapshot.pending_token_ids, *self.prompt_token_ids]

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def leader(self) -> Sequence:
        return self.sequences[0]

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)

    def live_sequences(self) -> list[Sequence]:
        return [seq for seq in self.sequences if not seq.finished]
