"""/v1/completions: engine delta outputs -> stream chunks or one response.

Choices are numbered prompt_index * n + choice_index, as OpenAI and vLLM do for batches.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.http.sse import TextEvent, sse
from server.protocol.common import Usage
from server.protocol.completion import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from server.serving.generation import GenerationRun
from server.serving.openai_logprobs import TokenNames, extend_completion_logprobs
from server.serving.state_usage import StateBudget
from tova_engine import CompletionOutput, RequestOutput


@dataclass(slots=True)
class Echo:
    """What a choice starts with when the request asked for echo."""

    text: str
    token_ids: list[int]


class CompletionChoiceState:
    """One choice: turns each delta into the chunk's choice and keeps the whole."""

    def __init__(self, index: int, echo: Echo | None, logprobs: bool,
                 names: TokenNames) -> None:
        self.index = index
        self._echo = echo
        self._names = names
        self._parts: list[str] = []
        self._length = 0  # characters of text so far: where the next token's offset starts
        self.num_tokens = 0
        self._logprobs = CompletionLogprobs() if logprobs else None
        self._last: CompletionChoice | None = None
        self.done = False

    def plain_text(self, out: CompletionOutput) -> str | None:
        """The delta's text when its chunk is text alone (no log-probs, no echo to prepend,
        not the last): taken into the choice. None: `update` builds the chunk."""
        if self.done or self._logprobs is not None or self._echo is not None \
                or out.finish_reason is not None:
            return None
        self._accumulate(out.text, len(out.token_ids), None)
        return out.text

    def update(self, out: CompletionOutput, request: RequestOutput) -> CompletionChoice | None:
        """The chunk's choice for this delta; None when there is nothing to send."""
        if self.done:
            return None
        logprobs = CompletionLogprobs() if self._logprobs is not None else None
        text = self._echo_prefix(request, logprobs) if self._echo is not None else ""
        if logprobs is not None and out.token_ids:
            extend_completion_logprobs(logprobs, out.token_ids, out.logprobs or [],
                                       self._length + len(text), self._names)
        text += out.text
        self._accumulate(text, len(out.token_ids), logprobs)
        self.done = out.finish_reason is not None
        if not (text or out.token_ids or self.done):
            return None
        choice = CompletionChoice(
            index=self.index, text=text, logprobs=logprobs, finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
        )
        if out.state_positions is not None:
            choice.state_positions = out.state_positions
        self._last = choice
        return choice

    def _echo_prefix(self, request: RequestOutput, logprobs: CompletionLogprobs | None) -> str:
        echo, self._echo = self._echo, None  # only once, before the first output text
        if logprobs is not None:
            positions = request.prompt_logprobs or [None] * len(echo.token_ids)
            extend_completion_logprobs(logprobs, echo.token_ids, positions, 0, self._names)
        return echo.text

    def _accumulate(self, text: str, num_tokens: int, logprobs: CompletionLogprobs | None) -> None:
        self._parts.append(text)
        self._length += len(text)
        self.num_tokens += num_tokens
        if logprobs is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self._logprobs, name).extend(getattr(logprobs, name))

    def result(self) -> CompletionChoice:
        last = self._last
        choice = CompletionChoice(
            index=self.index, text="".join(self._parts), logprobs=self._logprobs,
            finish_reason=last.finish_reason if last else None,
            stop_reason=last.stop_reason if last else None,
        )
        if last is not None and "state_positions" in last.model_fields_set:
            choice.state_positions = last.state_positions
        return choice


class CompletionSession:
    """One request's choices and counts, shared by the streaming and the full response."""

    def __init__(self, request_id: str, model: str, body: CompletionRequest,
                 prompt_ids: list[list[int]], echoes: list[Echo | None],
                 names: TokenNames, state: StateBudget | None = None) -> None:
        """state: the requests' state budget, for usage.state_details."""
        self.request_id = request_id
        self.state = state
        self.prompt_lengths = [len(ids) for ids in prompt_ids]
        self.model = model
        self.created = int(time.time())
        self.n = body.n or 1
        self.include_usage = body.include_usage
        self.prompt_tokens = sum(len(ids) for ids in prompt_ids)
        # Per prompt (one engine request each, whatever n): tokens the prefix cache restored.
        self.cached_tokens = [0] * len(prompt_ids)
        self.choices = [
            CompletionChoiceState(p * self.n + i, echoes[p], body.logprobs is not None, names)
            for p in range(len(prompt_ids)) for i in range(self.n)
        ]
        self._text_events: dict[int, TextEvent] = {}

    def _usage(self) -> Usage:
        details = None if self.state is None else self.state.details(
            self.prompt_lengths,
            [(self.prompt_lengths[c.index // self.n], c.num_tokens) for c in self.choices])
        return Usage.of(self.prompt_tokens, sum(c.num_tokens for c in self.choices),
                        sum(self.cached_tokens), details)

    def _response(self, choices: list[CompletionChoice]) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices)

    async def collect(self, run: GenerationRun) -> CompletionResponse:
        async for prompt_index, output in run:
            self.cached_tokens[prompt_index] = output.num_cached_tokens
            for out in output.outputs:
                self.choices[prompt_index * self.n + out.index].update(out, output)
        response = self._response([c.result() for c in self.choices])
        response.usage = self._usage()
        return response

    async def stream(self, run: GenerationRun) -> AsyncIterator[str]:
        async for prompt_index, output in run:
            self.cached_tokens[prompt_index] = output.num_cached_tokens
            for out in output.outputs:
                state = self.choices[prompt_index * self.n + out.index]
                text = state.plain_text(out)
                if text is not None:  # the common token: its event from a template
                    if text or out.token_ids:
                        yield self._text_event(state.index)(text)
                    continue
                choice = state.update(out, output)
                if choice is not None:
                    yield sse(self._chunk([choice]))
        if self.include_usage:
            final = self._response([])
            final.usage = self._usage()
            yield sse(final)

    def _text_event(self, index: int) -> TextEvent:
        event = self._text_events.get(index)
        if event is None:
            event = TextEvent(self._chunk([CompletionChoice(index=index, text=TextEvent.MARKER)]))
            self._text_events[index] = event
        return event

    def _chunk(self, choices: list[CompletionChoice]) -> CompletionResponse:
        chunk = self._response(choices)
        if self.include_usage:
            chunk.usage = None  # present as null on every chunk but the last (OpenAI)
        return chunk
