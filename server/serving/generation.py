"""The engine requests behind one HTTP request: one per prompt, all with the same params.

Prompts are validated up front (`prepare_run`), so a bad one is a 400 before any work
starts or any stream opens. Outputs come back merged, as (prompt index, delta output).
Closing the run, however it ends, aborts what is still running in the engine and frees the
queue places it held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from server.http.errors import from_value_error
from server.http.request_log import GenerationRecord
from server.metrics.request_tracker import RequestTracker
from server.serving.context import ServerContext
from tova_engine import RequestOutput, SamplingParams
from tova_engine.frontend.request_builder import PreparedRequest

_DONE = object()


def prepare_run(ctx: ServerContext, request_id: str, prompts: list[list[int]],
                params: SamplingParams, error_names: dict[str, str],
                resume_key: str | None = None, single_id: bool = False) -> GenerationRun:
    """Validate every prompt against the engine's limits, then take queue places (429).
    resume_key: the prompt continues from that saved state; single_id: the one prompt's
    engine request is `request_id` itself (a saved state is kept under it)."""
    ctx.require_engine()
    prepared = []
    for index, prompt in enumerate(prompts):
        engine_id = request_id if single_id else f"{request_id}-{index}"
        try:
            prepared.append(ctx.engine.prepare(prompt, params, engine_id, resume_key))
        except ValueError as exc:
            raise from_value_error(exc, error_names) from None
    return GenerationRun(ctx, request_id, prepared, params)


class GenerationRun:
    def __init__(self, ctx: ServerContext, request_id: str, prompts: list[PreparedRequest],
                 params: SamplingParams) -> None:
        self._ctx = ctx
        self._request_id = request_id
        self._prompts = prompts
        self._params = params
        self._ticket = ctx.admission.admit(len(prompts))
        self._stream = self._outputs()
        self.record = GenerationRecord(
            request_id, sum(len(p.core.prompt_token_ids) for p in prompts))

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._stream

    def finish_choice(self, prompt: int, choice: int) -> None:
        """End one choice now, as if the model had stopped: the server has all it needs of
        it (its tool calls). Its final output follows; a kept state is saved."""
        self._ctx.engine.finish(self._prompts[prompt].core.request_id, choice)

    async def close(self) -> None:
        await self._stream.aclose()
        self._ticket.release_all()  # places of prompts whose stream never started

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self._prompts) == 1:
            async with aclosing(self._one(0)) as stream:
                async for output in stream:
                    yield 0, output
            return
        async with aclosing(self._merged()) as merged:
            async for item in merged:
                yield item

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self._prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, index: int, queue: asyncio.Queue) -> None:
        try:
            async with aclosing(self._one(index)) as stream:
                async for output in stream:
                    queue.put_nowait((index, output))
        except Exception as exc:  # the consumer re-raises it; cancellation just ends
            queue.put_nowait(exc)
            return
        queue.put_nowait(_DONE)

    async def _one(self, index: int) -> AsyncIterator[RequestOutput]:
        tracker = RequestTracker(self._ctx.metrics, self._params.n)
        unfinished = "abort"  # unless it finishes or fails, the client went away
        counted = True
        try:
            async with aclosing(self._ctx.engine.generate(self._prompts[index])) as stream:
                async for output in stream:
                    tracker.observe(output)
                    self.record.observe(output)
                    yield output
        except ValueError:
            counted = False  # refused before it started: not a request that ran
            raise
        except Exception:
            unfinished = "error"
            raise
        finally:
            self._ticket.release()
            if counted:
                tracker.close(unfinished)

