"""The engine for servers: an async iterator per request, the step loop on its own thread.

The event loop never runs model code. Requests are validated and tokenized on the caller's
side (`LLMEngine.build_request` does not touch the scheduler), then handed to the engine
thread through a queue; outputs come back through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tova_engine.config import EngineConfig
from tova_engine.engine import LLMEngine, StatsCallback
from tova_engine.outputs import RequestOutput
from tova_engine.request import Request
from tova_engine.sampling_params import SamplingParams

logger = logging.getLogger("tova_engine")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine (the engine and other requests go on)."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, config: EngineConfig, stats_callback: StatsCallback | None = None) -> None:
        self.engine = LLMEngine(config, stats_callback)
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stopping = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_loop, name="tova-engine", daemon=True)
        self._thread.start()

    # ----- caller side (event loop) -------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead_error is None and not self._stopping

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as the request progresses (cumulative, delta or final only, as
        `params.output_kind` says). Raises ValueError for bad input before the first output,
        RequestFailedError if the request fails, EngineDeadError if the engine stops.
        Closing the iterator early aborts the request."""
        self._check_alive()
        request = self.engine.build_request(request_id or uuid.uuid4().hex, prompt, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request.request_id in self._streams:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self._streams[request.request_id] = stream
        try:
            # The loop may have died after the check above and failed every stream it knew
            # of before this one was registered: without a second look it would wait forever.
            self._check_alive()
        except EngineDeadError:
            with self._streams_lock:
                self._streams.pop(request.request_id, None)
            raise
        self._send("add", request)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)
            with self._streams_lock:
                self._streams.pop(request.request_id, None)

    def abort(self, request_id: str) -> None:
        """Thread-safe; the slot is free before the next step runs."""
        self._send("abort", request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _send(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))
        self._wakeup.set()

    def _check_alive(self) -> None:
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running: {self.dead_error!r}")

    # ----- engine thread ------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                for output in self.engine.step():
                    self._deliver(output)
        except BaseException as exc:  # the loop itself broke: every waiter must hear of it
            logger.exception("engine loop died")
            self.dead_error = exc
            self._fail_all(EngineDeadError(f"the engine loop stopped: {exc!r}"))
            return
        # Shut down with requests still open: their callers must not wait for ever either.
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(payload)
            elif (output := self.engine.abort_request(payload)) is not None:
                self._deliver(output)

    def _add(self, request: Request) -> None:
        try:
            self.engine.enqueue(request)
        except ValueError as exc:
            self._deliver_to(request.request_id, exc)

    def _deliver(self, output: RequestOutput) -> None:
        self._deliver_to(output.request_id, output)

    def _deliver_to(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is None:  # the caller has gone; an abort is already queued
            return
        # RuntimeError: the caller's event loop is closed; nobody is listening.
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        with self._streams_lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self._deliver_to(request_id, error)
