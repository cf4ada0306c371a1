"""The front end's side of a request: the core's token ids become text, logprob entries and
`RequestOutput`s (cumulative, delta or final), and stop strings end choices.

The core finishes choices on token-level conditions (EOS, stop token ids, max_tokens, the
length limit). A stop string is found here; the choice ends at once and the core is asked to
end it too, as "stop" (`ProcessedStep.stops`): its slot is freed and a kept state saved.
With `return_state`, the choice ends when the core confirms, because the state positions are
read when the slot is freed.

Work per step is proportional to the step's new tokens: delta outputs slice only new text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tova_engine.core.messages import SequenceFinish, SequenceRef, StepOutputs
from tova_engine.errors import InvalidRequestError
from tova_engine.execution.logprobs import TokenLogprobs
from tova_engine.frontend.detokenizer import IncrementalDetokenizer
from tova_engine.frontend.logprob_entries import LogprobBuilder
from tova_engine.outputs import (
    CompletionOutput,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from tova_engine.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[PositionLogprobs] | None
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    state_positions: list[list[int]] | None = None
    # The stop string found in this choice's text, once one is, and whether the core was
    # asked to end the choice for it (it then reports "stop", as for EOS).
    stop_string: str | None = None
    stop_sent: bool = False
    # How much of the output the caller has already been given (for delta outputs).
    tokens_sent: int = 0
    text_sent: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_output(self, delta: bool) -> CompletionOutput:
        token_start = self.tokens_sent if delta else 0
        text_start = self.text_sent if delta else 0
        text = ""
        if self.detokenizer is not None:
            text = self.detokenizer.emittable_since(text_start, self.finished)
        out = CompletionOutput(
            index=self.index,
            text=text,
            token_ids=self.token_ids[token_start:],
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=None if self.logprobs is None else self.logprobs[token_start:],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            state_positions=self.state_positions,
        )
        self.tokens_sent = len(self.token_ids)
        self.text_sent = text_start + len(text)
        return out


@dataclass(slots=True, eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        # Asked for every request of every step: a plain loop, not a generator.
        for seq in self.sequences:  # noqa: SIM110
            if seq.finish_reason is None:
                return False
        return True

    def output(self) -> RequestOutput:
        """What the caller receives now (cumulative or delta, as it asked)."""
        delta = self.params.output_kind == "delta"
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[seq.to_output(delta) for seq in self.sequences],
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
            num_cached_tokens=self.num_cached_tokens,
        )


class ProcessedStep(NamedTuple):
    outputs: list[RequestOutput]
    # Choices a stop string ended: the core must free their slots.
    stops: list[SequenceRef]


class OutputProcessor:
    """Owns the front end's `RequestState`s from `add` until their last output."""

    def __init__(self, tokenizer: Any) -> None:
        self._logprobs = LogprobBuilder(tokenizer)
        self._requests: dict[str, RequestState] = {}

    def add(self, state: RequestState) -> None:
        if state.request_id in self._requests:
            raise InvalidRequestError(
                "request_id", f"request_id {state.request_id!r} is already in use"
            )
        self._requests[state.request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request here (the core is told separately); its final output."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.sequences:
            if not seq.finished:
                seq.finish_reason = "abort"
        state.metrics.finished_time = time.time()
        return state.output()

    def process(self, step: StepOutputs) -> ProcessedStep:
        touched: dict[str, RequestState] = {}
        for request_id in step.admitted:
            if (state := self._requests.get(request_id)) is not None:
                state.metrics.first_scheduled_time = step.started_at
        for request_id, tokens in step.cached_tokens.items():
            if (state := self._requests.get(request_id)) is not None:
                state.num_cached_tokens = tokens
        for values in step.prompt_logprobs:
            self._prompt_logprobs(values)
        finishes = {(f.request_id, f.index): f for f in step.finished}
        stops = self._tokens(step, finishes, touched)
        for finish in step.finished:
            self._finish(finish, touched)
        for failure in step.failed:
            if (state := self._requests.get(failure.request_id)) is not None:
                state.error = failure.message
                touched[failure.request_id] = state
        return ProcessedStep(self._outputs(touched), stops)

    def _prompt_logprobs(self, values) -> None:
        state = self._requests.get(values.request_id)
        if state is None or state.prompt_logprobs is None:
            return
        lists = TokenLogprobs(values.logprobs, values.ranks, values.top_ids, values.top_logprobs)
        # No output for this alone: callers get the prompt's log-probs whole, with the
        # first token or the end of the request.
        state.prompt_logprobs.extend(
            self._logprobs.prompt_positions(state.prompt_token_ids, values.first, lists)
        )

    def _tokens(self, step: StepOutputs, finishes, touched) -> list[SequenceRef]:
        stops: list[SequenceRef] = []
        now = time.time()
        for row, request_id in enumerate(step.request_ids):
            state = self._requests.get(request_id)
            if state is None:
                continue
            touched[request_id] = state
            seq = state.sequences[step.indexes[row]]
            if seq.finished or seq.stop_string is not None:  # ended here; the core ran on
                continue
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            self._append(state, seq, step, row)
            if seq.stop_string is not None and (request_id, seq.index) not in finishes:
                stops.append(SequenceRef(request_id, seq.index))
                seq.stop_sent = True
                if not state.params.return_state:  # else: wait for the state positions
                    seq.finish_reason, seq.stop_reason = "stop", seq.stop_string
        return stops

    def _append(self, state: RequestState, seq: SequenceState, step: StepOutputs, row: int):
        token = step.token_ids[row]
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            top = state.params.logprobs
            seq.logprobs.append(
                self._logprobs.position(
                    token,
                    step.logprobs[row],
                    step.ranks[row],
                    step.top_ids[row][:top] if top else [],
                    step.top_logprobs[row][:top] if top else [],
                )
            )
            seq.cumulative_logprob += step.logprobs[row]
        if seq.detokenizer is not None:
            seq.stop_string = seq.detokenizer.append(token)

    def _finish(self, finish: SequenceFinish, touched: dict[str, RequestState]) -> None:
        state = self._requests.get(finish.request_id)
        if state is None:
            return
        seq = state.sequences[finish.index]
        touched[finish.request_id] = state
        if seq.finished:  # a stop string ended it here first
            return
        seq.state_positions = finish.state_positions
        if seq.stop_string is not None and (finish.reason != "stop" or seq.stop_sent):
            # The stop string ends it, unless EOS or a stop token id did in the same step
            # (they come first).
            seq.finish_reason, seq.stop_reason = "stop", seq.stop_string
        else:
            seq.finish_reason, seq.stop_reason = finish.reason, finish.stop_reason

    def _outputs(self, touched: dict[str, RequestState]) -> list[RequestOutput]:
        outputs = []
        for request_id, state in touched.items():
            finished = state.finished
            if finished:
                state.metrics.finished_time = time.time()
                del self._requests[request_id]
            if finished or state.params.output_kind != "final":
                outputs.append(state.output())
        return outputs


def merge_delta(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive delta outputs of one request as one."""
    earlier = {out.index: out for out in first.outputs}
    return RequestOutput(
        request_id=then.request_id,
        prompt=then.prompt,
        prompt_token_ids=then.prompt_token_ids,
        prompt_logprobs=then.prompt_logprobs,
        outputs=[_merge_choice(earlier.get(out.index), out) for out in then.outputs],
        finished=then.finished,
        metrics=then.metrics,
        error=then.error,
        num_cached_tokens=then.num_cached_tokens,
    )


def _merge_choice(first: CompletionOutput | None, then: CompletionOutput) -> CompletionOutput:
    if first is None:
        return then
    logprobs = then.logprobs
    if first.logprobs is not None and then.logprobs is not None:
        logprobs = first.logprobs + then.logprobs
    return CompletionOutput(
        index=then.index,
        text=first.text + then.text,
        token_ids=first.token_ids + then.token_ids,
        cumulative_logprob=then.cumulative_logprob,
        logprobs=logprobs,
        finish_reason=then.finish_reason,
        stop_reason=then.stop_reason,
        state_positions=then.state_positions,
    )
