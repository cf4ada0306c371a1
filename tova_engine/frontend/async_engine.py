"""The engine for servers: the core in its own process, outputs as an async iterator per
request. This is the only door the server uses.

The front end (this object, in the server's process) validates and tokenizes requests, sends
them to the core as token ids, and turns each step's `StepOutputs` into text and
`RequestOutput`s on the client thread (`frontend/core_client.py`), handing them to the requests'
event loops in one call per loop per step. The event loop never runs model code, never
waits on the core's GIL and never waits for a lock the client thread holds: requests opened
or closed reach the client thread through a queue it drains before each step's outputs (an
output cannot precede the request's own message to the core, which is sent after it).
A stream that falls behind gets the outputs that piled up merged into one.

If the core process dies, every request in flight fails at once with `EngineDeadError`, new
ones are refused while it restarts, and the core is restarted with back-off.

By default the engine starts its own core. With `attach` it is one of several front-end
processes sharing a core that another process supervises (`shared_core.py`): its requests
carry its index, and only their outputs come back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tova_engine.config import EngineConfig
from tova_engine.core.messages import (
    Abort,
    AddRequest,
    CoreReady,
    DropStates,
    EngineInfo,
    SequenceRef,
    StepOutputs,
    StepStats,
)
from tova_engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    RequestFailedError,
    UnknownStateError,
)
from tova_engine.execution.lifetime import close_with
from tova_engine.frontend.attached_core import AttachedCoreClient
from tova_engine.frontend.core_client import (
    CoreClient,
    CoreStartError,
    RestartPolicy,
    load_tokenizer,
)
from tova_engine.frontend.output_processor import OutputProcessor, merge_delta
from tova_engine.frontend.request_builder import PreparedRequest, RequestBuilder
from tova_engine.frontend.shared_core import CoreAttachment
from tova_engine.outputs import RequestOutput
from tova_engine.sampling_params import SamplingParams
from tova_engine.state.store import SavedState, StoreStats

logger = logging.getLogger("tova_engine")
_IDLE = StepStats("decode", 0.0, 0, 0, 0, [], 0, 0, 0)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    held: object = None  # an error that waits until the outputs before it have gone out

    async def next(self, delta: bool) -> object:
        """The next item, or what it and the outputs queued behind it add up to: a consumer
        slower than the engine sends one chunk for several steps instead of falling further
        behind."""
        if self.held is not None:
            item, self.held = self.held, None
            return item
        item = await self.queue.get()
        while (isinstance(item, RequestOutput) and not item.finished and item.error is None
               and not self.queue.empty()):
            following = self.queue.get_nowait()
            if not isinstance(following, RequestOutput) or following.error is not None:
                # An error goes out on its own, after the tokens before it: folded into them,
                # it would be raised and take them along (a slow reader lost streamed tokens).
                self.held = following
                break
            item = merge_delta(item, following) if delta else following
        return item


class AsyncEngine:
    """Raises ValueError (naming the setting) for a configuration or model the core refuses.
    `shutdown()` stops the core (or use the engine in a `with` or `async with` block); an
    engine collected or left open at interpreter exit is shut down then."""

    def __init__(
        self,
        config: EngineConfig,
        stats_callback: Callable[[StepStats], None] | None = None,
        restart_policy: RestartPolicy | None = None,
        attach: CoreAttachment | None = None,
    ) -> None:
        # Open requests by id. The event loop adds and removes; the client thread only reads
        # (a dict's single operations are atomic).
        self._streams: dict[str, _Stream] = {}
        # Opened and closed requests, for the client thread, which alone owns `_outputs`.
        self._changes: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._stats_callbacks = [] if stats_callback is None else [stats_callback]
        self._restart_callbacks: list[Callable[[], None]] = []
        self.last_stats = _IDLE
        # The core's stored states (keep_state), as the core last reported them.
        self.saved_states: dict[str, SavedState] = {}
        self.store_stats = StoreStats()
        self._started = False  # the first CoreReady is the start, later ones are restarts
        # Requests of this front end holding a slot (client thread writes, others read len).
        self._running: set[str] = set()
        self.client_index = 0 if attach is None else attach.client
        self._client: CoreClient | AttachedCoreClient
        # Weakly: the client thread keeps its callbacks, and must not keep an engine that
        # its owner dropped (nor, through it, the core process) alive.
        on_step, on_lost, on_ready = map(_weakly, (self._on_step, self._on_lost, self._on_ready))
        if attach is None:
            self._client = CoreClient(config, on_step, on_lost, on_ready, restart_policy)
        else:
            self._client = AttachedCoreClient(attach, on_step, on_lost, on_ready)
        self.config = config
        try:
            self._client.start()  # _on_ready has set up what follows from the model
        except CoreStartError as exc:
            raise ValueError(str(exc)) from None
        # Shut down when collected or left open at exit too: a tensor-parallel core process
        # is no daemon, and multiprocessing would wait for it at exit for ever.
        self._closer = close_with(self, _shut_down, self._client)

    # ----- what the server may ask --------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """The core is loaded and answering: requests are accepted."""
        return self._client.ready

    @property
    def dead_reason(self) -> str | None:
        """Why the engine will not come back (restarts exhausted or shut down), else None."""
        return self._client.dead_reason

    @property
    def num_running(self) -> int:
        """This front end's requests that hold a slot (with one front end: all of them)."""
        return len(self._running)

    @property
    def restarts(self) -> int:
        return self._client.restarts

    @property
    def core_pid(self) -> int | None:
        return self._client.pid

    def on_stats(self, callback: Callable[[StepStats], None]) -> None:
        """Call `callback` with every step's stats (on the client thread: keep it cheap)."""
        self._stats_callbacks.append(callback)

    def on_restart(self, callback: Callable[[], None]) -> None:
        self._restart_callbacks.append(callback)

    def tokenize(self, prompt: str) -> list[int]:
        return self._builder.tokenize(prompt)

    def prepare(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        resume_key: str | None = None,
    ) -> PreparedRequest:
        """Validate and tokenize (raises InvalidRequestError) without queueing anything.
        resume_key: continue from the state a request with `keep_state` saved under its id
        (UnknownStateError if the core holds none under that key)."""
        resume = None
        if resume_key is not None:
            resume = self.saved_states.get(resume_key)
            if resume is None:
                raise UnknownStateError(
                    "previous_response_id", f"no stored state {resume_key!r}"
                )
        return self._builder.build(request_id or uuid.uuid4().hex, prompt, params, None, resume)

    def adopt_state(self, state: SavedState) -> None:
        """Know a state the core can reach but did not report: one another front end, an
        earlier run or another replica wrote to the shared --state-store-dir (the core finds
        the file by its key when a continuation names it)."""
        self.saved_states.setdefault(state.key, state)

    def drop_states(self, keys: list[str]) -> None:
        """Delete stored states (thread-safe; gone from `saved_states` at once)."""
        for key in keys:
            self.saved_states.pop(key, None)
        self._client.send(DropStates(keys=list(keys)))

    async def generate(
        self,
        prompt: str | list[int] | PreparedRequest,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as the request progresses (cumulative, delta or final only, as
        `params.output_kind` says). Raises InvalidRequestError for bad input before the
        first output, RequestFailedError if the request fails, EngineDeadError if the core
        is not running or dies. Closing the iterator early aborts the request."""
        request = prompt
        if not isinstance(request, PreparedRequest):
            request = self.prepare(prompt, params, request_id)
        request_id = request.request_id
        stream = self._open(request)
        delta = request.state.params.output_kind == "delta"
        finished = False
        try:
            while not finished:
                item = await stream.next(delta)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe; the slot is free before the core's next step."""
        self._changes.put(("close", request_id))
        self._client.send(Abort(requests=[request_id]))

    def finish(self, request_id: str, index: int) -> None:
        """Thread-safe: end one choice now as if the model had stopped ("stop": a kept state
        is saved); its final output follows as for any finish."""
        self._client.send(Abort(finished=[SequenceRef(request_id, index)]))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closer.detach()
        self._client.shutdown(timeout)
        self._fail_all(EngineDeadError("the engine was shut down"))

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.shutdown)  # it joins threads and a process: off the loop

    # ----- event loop side ----------------------------------------------------------------

    def _open(self, request: PreparedRequest) -> _Stream:
        self._check_ready()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        if self._streams.setdefault(request.request_id, stream) is not stream:
            raise InvalidRequestError(
                "request_id", f"request_id {request.request_id!r} is already in use"
            )
        self._changes.put(("open", request.state))
        try:
            # Again: a core lost after the first check failed every stream it knew of, and
            # this one would otherwise wait for ever.
            self._check_ready()
        except EngineDeadError:
            self._streams.pop(request.request_id, None)
            self._changes.put(("close", request.request_id))
            raise
        self._client.send(AddRequest.of(request.core, self.client_index))
        return stream

    def _check_ready(self) -> None:
        if not self.is_ready:
            why = self.dead_reason or "it is restarting"
            raise EngineDeadError(f"the engine core is not running: {why}")

    # ----- client thread ------------------------------------------------------------------

    def _apply_changes(self) -> None:
        while True:
            try:
                kind, item = self._changes.get_nowait()
            except queue.Empty:
                return
            if kind == "open":
                self._outputs.add(item)
            else:
                self._outputs.abort(item)
                self._running.discard(item)

    def _on_step(self, step: StepOutputs) -> None:
        try:
            self._process_step(step)
        except Exception:
            # A bug in output handling must not end the client thread (every request would
            # then wait for ever): the requests of this step fail, the others go on.
            logger.exception("turning the engine core's step into outputs failed")
            self._fail_step(step)

    def _process_step(self, step: StepOutputs) -> None:
        self._apply_changes()
        for saved in step.saved:  # before the outputs: a finished caller can continue at once
            self.saved_states[saved.key] = saved
        for key in step.dropped:
            self.saved_states.pop(key, None)
        if step.store is not None:
            self.store_stats = step.store
        self._running.update(step.admitted)
        processed = self._outputs.process(step)
        for output in processed.outputs:
            if output.finished:
                self._running.discard(output.request_id)
        for failure in step.failed:
            self._running.discard(failure.request_id)
        deliveries = [(self._streams.get(o.request_id), o) for o in processed.outputs]
        if processed.stops:
            self._client.send(Abort(finished=processed.stops))  # as stopped: a kept state is saved
        if step.stats is not None:  # before the outputs: a caller that sees them sees these
            self.last_stats = step.stats
            for callback in self._stats_callbacks:
                callback(step.stats)
        self._deliver(deliveries)

    def _fail_step(self, step: StepOutputs) -> None:
        """End every request the step touched with an error, here and in the core."""
        request_ids = {*step.admitted, *step.request_ids}
        request_ids.update(f.request_id for f in step.finished)
        request_ids.update(f.request_id for f in step.failed)
        request_ids.update(p.request_id for p in step.prompt_logprobs)
        error = RequestFailedError("internal error while building this request's output")
        for request_id in request_ids:
            self._outputs.abort(request_id)
            self._running.discard(request_id)
        self._client.send(Abort(requests=sorted(request_ids)))
        self._deliver([(self._streams.get(i), error) for i in request_ids])

    def _on_lost(self, reason: str) -> None:
        self.last_stats = _IDLE
        self._fail_all(EngineDeadError(f"the engine core stopped ({reason}); restarting it"))

    def _on_ready(self, ready: CoreReady) -> None:
        # What the (new) core's store holds: its disk tier survives a restart, its host tier
        # does not.
        self.saved_states = {saved.key: saved for saved in ready.stored}
        if not self._started:
            self._started = True
            self._set_up(ready)
            return
        for callback in self._restart_callbacks:
            callback()

    def _set_up(self, ready: CoreReady) -> None:
        """What follows from the loaded model, set before the client thread hands over any
        step: a core shared with other front ends sends this one every step's stats from
        the moment it is attached."""
        self.info: EngineInfo = ready.info
        self.tokenizer = load_tokenizer(ready)
        self.config = self.config.replace(max_num_seqs=ready.info.max_num_seqs)
        self._builder = RequestBuilder(self.tokenizer, self.info)
        self._outputs = OutputProcessor(self.tokenizer)

    def _fail_all(self, error: BaseException) -> None:
        """Client thread (or after it has stopped): end every open request with `error`."""
        self._apply_changes()
        self._running.clear()
        self._outputs = OutputProcessor(self.tokenizer)
        self._deliver([(stream, error) for stream in list(self._streams.values())])

    @staticmethod
    def _deliver(deliveries: list[tuple[_Stream | None, object]]) -> None:
        """One wake-up per event loop, however many requests got something."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for stream, item in deliveries:
            if stream is not None:  # None: the caller has gone; an abort is on its way
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():
            # RuntimeError: that event loop is closed; nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """`method`, called while its object lives (a no-op after)."""
    ref = weakref.WeakMethod(method)

    def call(*args: object) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call


def _shut_down(client: CoreClient | AttachedCoreClient) -> None:
    """A collected or abandoned engine's client. Collection may run on the client thread
    itself ("core-client"), and shutting down joins that thread: then another one does it."""
    if threading.current_thread().name == "core-client":
        threading.Thread(target=client.shutdown, name="core-client-shutdown", daemon=True).start()
    else:
        client.shutdown()


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for waiting, item in items:
        waiting.put_nowait(item)

