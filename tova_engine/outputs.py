"""What the engine returns to callers, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tova_engine.state.snapshots import StateSnapshot


@dataclass(slots=True)
class Logprob:
    logprob: float
    # 1 = the most likely token.
    rank: int | None = None
    decoded_token: str | None = None


# Per position: token id -> Logprob (the chosen token plus the top-k alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    # "stop" | "length" | "abort" | "error"; None while running.
    finish_reason: str | None = None
    # The stop string or stop token id that ended the output, when one did.
    stop_reason: str | int | None = None
    # With return_state: per layer, absolute positions of the tokens kept in the state.
    state_positions: list[list[int]] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Set when the request failed inside the engine; it failed alone.
    error: str | None = None
    # With keep_state (offline): the state at the end, for `LLM.generate(resume_from=...)`.
    state: StateSnapshot | None = None
    # Prompt tokens whose state came from the prefix cache instead of a prefill (vLLM's name).
    num_cached_tokens: int = 0
