"""Request and sequence bookkeeping: counters and lists only, never tensors.

A request with n choices is one `Request` holding n `Sequence`s. The prompt is prefilled once,
in the first sequence's slot; the state is then copied to the other choices' slots so each
samples its own continuation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tova_engine.outputs import (
    CompletionOutput,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from tova_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from tova_engine.detokenizer import IncrementalDetokenizer


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    index: int
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    slot: int = -1
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    state_positions: list[list[int]] | None = None
    # How much of the output the caller has already been given (for delta outputs).
    tokens_sent: int = 0
    text_sent: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""

    def to_output(self, delta: bool, finished: bool) -> CompletionOutput:
        text = self.detokenizer.emittable_text(finished) if self.detokenizer else ""
        token_start = self.tokens_sent if delta else 0
        text_start = self.text_sent if delta else 0
        out = CompletionOutput(
            index=self.index,
            text=text[text_start:],
            token_ids=self.output_token_ids[token_start:],
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=None if self.logprobs is None else self.logprobs[token_start:],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            state_positions=self.state_positions,
        )
        self.tokens_sent = len(self.output_token_ids)
        self.text_sent = len(text)
        return out


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    # This request's state size (at most the engine's).
    capacity: int
    # Resolved output limit (SamplingParams.max_tokens, or what the length limit leaves).
    max_tokens: int
    sequences: list[Sequence]
    metrics: RequestMetrics
    # Prompt tokens already run through the model (in the first sequence's slot).
    num_computed: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

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


def request_output(request: Request) -> RequestOutput:
    """What the caller receives for a request now (cumulative or delta, as it asked)."""
    delta = request.params.output_kind == "delta"
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        prompt_logprobs=request.prompt_logprobs,
        outputs=[seq.to_output(delta, seq.finished) for seq in request.sequences],
        finished=request.finished,
        metrics=request.metrics,
        error=request.error,
    )
