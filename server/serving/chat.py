"""/v1/chat/completions: engine delta outputs -> stream chunks or one response.

A stream sends, per choice, a first chunk with the role, then content deltas, then a chunk
with an empty delta and the finish reason (as OpenAI's API does). With tools, content is held
where a call may begin, and each call goes out whole in a delta of its own once it is complete
(server/serving/tool_calls/stream.py); a choice that has called enough ends there, and the
request's generation stops once every choice has ended.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from server.http.sse import TextEvent, sse
from server.protocol.chat import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChatStreamChoice,
)
from server.protocol.common import Usage
from server.protocol.tools import FunctionCallDelta, ToolCallDelta
from server.serving.generation import GenerationRun
from server.serving.openai_logprobs import TokenNames, chat_logprobs
from server.serving.reasoning import ReasoningStream
from server.serving.state_usage import StateBudget
from server.serving.tool_calls.plan import ToolPlan
from server.serving.tool_calls.stream import ToolCallStream
from tova_engine import CompletionOutput


class ChatChoiceState:
    def __init__(self, index: int, top_logprobs: int | None,
                 names: TokenNames, tools: ToolPlan | None = None,
                 reasoning: bool = False) -> None:
        """tools: calls may come back; a stream then holds back what may be one. reasoning:
        split the model's thinking into `reasoning_content` (server/serving/reasoning.py)."""
        self.index = index
        self._tools = None if tools is None else ToolCallStream(tools)
        self._reasoning = ReasoningStream() if reasoning else None
        self._reasoning_parts: list[str] = []
        self._calls_sent = 0  # calls streamed so far: the next one's index
        self._top = top_logprobs  # None: no logprobs asked for
        self._names = names
        self._parts: list[str] = []
        self._logprobs: list = []
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cut = False  # ended by its tool calls before the engine finished it
        self.engine_told = False  # and the engine was asked to finish it
        self.state_positions: list[list[int]] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain(self) -> bool:
        """Its deltas are content alone (no log-probs, tools or reasoning to split)."""
        return self._top is None and self._tools is None and self._reasoning is None

    def take_text(self, out: CompletionOutput) -> str:
        """A plain choice's delta that does not finish it: its content."""
        self._parts.append(out.text)
        self.num_tokens += len(out.token_ids)
        return out.text

    def update(self, out: CompletionOutput) -> list[ChatStreamChoice]:
        """The chunks' choices for this delta: content (if any), then the finish (if now)."""
        if self.done:  # the tokens its tool calls' stop left in flight still count
            self.num_tokens += len(out.token_ids)
            return []
        logprobs = None
        if self._top is not None and out.token_ids:
            entries = chat_logprobs(out.token_ids, out.logprobs or [], self._top, self._names)
            self._logprobs.extend(entries)
            logprobs = ChatChoiceLogprobs(content=entries)
        text, thought = out.text, None
        if self._reasoning is not None:
            thought, text = self._reasoning.push(out.text, final=out.finish_reason is not None)
            self._reasoning_parts.append(thought)
        self._parts.append(text)  # the content only
        self.num_tokens += len(out.token_ids)
        reason = out.finish_reason
        choices = []
        calls = []
        if self._tools is not None:
            progress = self._tools.push(self.text, final=reason is not None)
            text, calls = progress.content, progress.calls
            if progress.stop and reason is None:  # called enough: the choice ends here
                reason, self.cut = "tool_calls", True
        if out.text or out.token_ids:
            delta = ChatDelta(content=text)
            if thought:  # the content too when the block closed within this delta
                delta = ChatDelta(reasoning_content=thought, **({"content": text} if text else {}))
            if self._tools is None or text or thought or logprobs is not None:
                choices.append(ChatStreamChoice(index=self.index, delta=delta, logprobs=logprobs))
        if calls:
            choices.append(self._call_deltas(calls))
        if reason is not None:
            self.finish_reason, self.stop_reason = reason, out.stop_reason
            self.state_positions = out.state_positions
            if self._tools is not None and self._tools.calls and reason == "stop":
                self.finish_reason = "tool_calls"
            choices.append(self._finish_choice())
        return choices

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def _call_deltas(self, calls: list) -> ChatStreamChoice:
        """Completed calls, each whole in one delta entry (the client joins them by index)."""
        deltas = []
        for call in calls:
            deltas.append(ToolCallDelta(
                index=self._calls_sent, id=call.id, type="function",
                function=FunctionCallDelta(name=call.function.name,
                                           arguments=call.function.arguments)))
            self._calls_sent += 1
        return ChatStreamChoice(index=self.index, delta=ChatDelta(tool_calls=deltas))

    def _finish_choice(self) -> ChatStreamChoice:
        choice = ChatStreamChoice(index=self.index, delta=ChatDelta(),
                                  finish_reason=self.finish_reason, stop_reason=self.stop_reason)
        if self.state_positions is not None:
            choice.state_positions = self.state_positions
        return choice

    def result(self) -> ChatChoice:
        logprobs = ChatChoiceLogprobs(content=self._logprobs) if self._top is not None else None
        message = ChatMessageOut(content=self.text)
        if self._tools is not None:
            content, calls = self._tools.result()
            message = ChatMessageOut(content=content, tool_calls=calls) if calls else \
                ChatMessageOut(content=content)
        if self._reasoning is not None and self._reasoning.thinking:
            message.reasoning_content = "".join(self._reasoning_parts)
        choice = ChatChoice(
            index=self.index, message=message,
            logprobs=logprobs, finish_reason=self.finish_reason, stop_reason=self.stop_reason,
        )
        if self.state_positions is not None:
            choice.state_positions = self.state_positions
        return choice


class ChatSession:
    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest,
                 prompt_tokens: int, names: TokenNames, tools: ToolPlan | None = None,
                 reasoning: bool = False, state: StateBudget | None = None) -> None:
        """state: the request's state budget, for usage.state_details."""
        self.request_id = request_id
        self.state = state
        self.model = model
        self.created = int(time.time())
        self.include_usage = body.include_usage
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # prompt tokens the prefix cache restored
        top = (body.top_logprobs or 0) if body.logprobs else None
        self.choices = [ChatChoiceState(i, top, names, tools, reasoning)
                        for i in range(body.n or 1)]
        self._content_events: dict[int, TextEvent] = {}

    def _usage(self) -> Usage:
        details = None if self.state is None else self.state.details(
            [self.prompt_tokens], [(self.prompt_tokens, c.num_tokens) for c in self.choices])
        return Usage.of(self.prompt_tokens, sum(c.num_tokens for c in self.choices),
                        self.cached_tokens, details)

    async def collect(self, run: GenerationRun) -> ChatCompletionResponse:
        async for _, output in run:
            self.cached_tokens = output.num_cached_tokens
            for out in output.outputs:
                self._update(run, out)
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model,
            choices=[c.result() for c in self.choices], usage=self._usage(),
        )

    async def stream(self, run: GenerationRun) -> AsyncIterator[str]:
        # The role goes out at once: the client sees the stream open before the first token.
        for choice in self.choices:
            yield sse(self._chunk([ChatStreamChoice(
                index=choice.index, delta=ChatDelta(role="assistant", content=""))]))
        async for _, output in run:
            self.cached_tokens = output.num_cached_tokens
            for out in output.outputs:
                state = self.choices[out.index]
                if state.plain and out.finish_reason is None and not state.done:
                    # The common token: its event from a template, no models built.
                    if out.text or out.token_ids:
                        yield self._content_event(state.index)(state.take_text(out))
                    continue
                for choice in self._update(run, out):
                    yield sse(self._chunk([choice]))
        if self.include_usage:
            final = self._chunk([])
            final.usage = self._usage()
            yield sse(final)

    def _update(self, run: GenerationRun, out: CompletionOutput) -> list[ChatStreamChoice]:
        """A choice's delta; a choice its tool calls ended is finished in the engine too."""
        state = self.choices[out.index]
        choices = state.update(out)
        if state.cut and not state.engine_told:
            state.engine_told = True
            run.finish_choice(0, out.index)
        return choices

    def _content_event(self, index: int) -> TextEvent:
        event = self._content_events.get(index)
        if event is None:
            delta = ChatDelta(content=TextEvent.MARKER)
            event = TextEvent(self._chunk([ChatStreamChoice(index=index, delta=delta)]))
            self._content_events[index] = event
        return event

    def _chunk(self, choices: list[ChatStreamChoice]) -> ChatCompletionChunk:
        chunk = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                    choices=choices)
        if self.include_usage:
            chunk.usage = None  # present as null on every chunk but the last (OpenAI)
        return chunk
