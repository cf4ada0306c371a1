"""The engine core's own process: the step loop alone on its interpreter.

Two I/O threads move messages so that the loop's thread only schedules and steps: one
receives and decodes what the front ends send (requests, aborts, shutdown), one cuts each
step's `StepOutputs` per front end (`routing.py`), encodes and sends them. Socket calls
release the GIL; msgspec's (de)coding is short.

It serves one front end, or several (`--api-server-count`): one output socket each, in the
order of `output_addresses`; requests say which front end sent them. `CoreReady` and
`CoreFailed` go to every front end and to the supervisor's control address, if any.

The process exits when told to, when its parent disappears, or when the loop breaks (after
sending `CoreFailed` with the reason); its parent (`frontend/core_client.py`) restarts it.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

import zmq

from tova_engine.config import EngineConfig
from tova_engine.core.engine_core import EngineCore
from tova_engine.core.eviction_ages import compact, one_two_five
from tova_engine.core.messages import (
    Abort,
    AddRequest,
    CoreFailed,
    CoreReady,
    DropStates,
    Hello,
    RequestFailure,
    SequenceFinish,
    Shutdown,
    StepOutputs,
    Wire,
)
from tova_engine.core.routing import OutputRouter
from tova_engine.errors import InvalidRequestError
from tova_engine.step.request import CoreRequest

logger = logging.getLogger("tova_engine")
# How often the receiving thread checks that the front end (the parent process) still lives.
PARENT_CHECK_S = 1.0


def run_core(
    config: EngineConfig, input_address: str, output_addresses: list[str], log_level: int,
    control_address: str | None = None,
) -> None:
    """The spawned process's entry point."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s"
    )
    # Ctrl-C (or a SIGTERM sent to the whole process group: `timeout`, a service manager)
    # reaches this process too; the front end drains, then says Shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    context = zmq.Context()
    outputs = [push_socket(context, address) for address in output_addresses]
    control = [] if control_address is None else [push_socket(context, control_address)]
    inputs = context.socket(zmq.PULL)
    inputs.bind(input_address)  # the front ends queue their messages until this exists
    wire = Wire()
    try:
        core = EngineCore(config)
    except BaseException as exc:  # the front end reports why the core could not start
        failed = wire.encoder.encode(CoreFailed(_describe(exc), during_startup=True))
        for socket in outputs + control:
            socket.send(failed)
            socket.close(linger=5000)
        sys.exit(1)
    age_bounds = one_two_five(core.info.max_model_len)
    tokenizer = core.executor.tokenizer
    pickled = b"" if tokenizer is None else pickle.dumps(tokenizer)

    def ready() -> CoreReady:
        return CoreReady(core.info, pickled, core.store.saved(), input_address, os.getpid())

    announced = wire.encoder.encode(ready())
    for socket in outputs + control:
        socket.send(announced)
    code = CoreLoop(core, inputs, outputs, ready, control, age_bounds).run()
    if not code:
        core.close()  # the other tensor-parallel ranks, if any
    for socket in outputs + control:
        socket.close(linger=5000)
    inputs.close(linger=0)
    if code:  # a broken loop may have left the device unusable: skip the interpreter's exit
        os._exit(code)
    sys.exit(code)


def push_socket(context: zmq.Context, address: str) -> zmq.Socket:
    """A connected PUSH socket without a send limit: a send never waits, messages queue on
    this side until the peer has bound `address` (every sender between core, front ends and
    supervisor is one of these)."""
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.connect(address)
    return socket


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Prepared(NamedTuple):
    request: CoreRequest
    grammars: list | None  # one matcher per sequence, or None without a constraint
    error: InvalidRequestError | None = None


class _ForClient(NamedTuple):
    """A message for one front end only (a `CoreReady` it asked for)."""

    client: int
    message: CoreReady


class CoreLoop:
    def __init__(
        self, core: EngineCore, inputs: zmq.Socket, outputs: list[zmq.Socket],
        ready: Callable[[], CoreReady] | None = None, control: list[zmq.Socket] = (),
        age_bounds: tuple[int, ...] = (),
    ) -> None:
        self.core = core
        self._age_bounds = age_bounds
        self._ready = ready
        self._router = OutputRouter(len(outputs))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._parent = os.getppid()
        self._receiver = threading.Thread(
            target=self._receive, args=(inputs,), name="core-in", daemon=True
        )
        self._sender = threading.Thread(
            target=self._send, args=(outputs, list(control)), name="core-out", daemon=True
        )

    def run(self) -> int:
        """Steps until Shutdown (returns 0) or until the loop breaks (returns 1)."""
        self._receiver.start()
        self._sender.start()
        code = 0
        try:
            while self._handle_inbox(block=not self.core.has_unfinished_requests()):
                step = self.core.step()
                if step is not None:
                    self._outbox.put(step)
        except BaseException as exc:  # contained failures never get here: this is fatal
            logger.exception("engine core loop died")
            self._outbox.put(CoreFailed(_describe(exc), during_startup=False))
            code = 1
        self._outbox.put(None)
        self._sender.join(timeout=10)
        return code

    def _handle_inbox(self, block: bool) -> bool:
        """Apply every waiting message (waiting for one when idle); False on Shutdown."""
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(message, Shutdown):
                return False
            if isinstance(message, _Prepared):
                self._add(message)
            elif isinstance(message, Abort):
                self._abort(message)
            elif isinstance(message, Hello):
                if self._ready is not None and 0 <= message.client < self._router.clients:
                    self._outbox.put(_ForClient(message.client, self._ready()))
            elif isinstance(message, DropStates):
                self.core.drop_states(message.keys)
                step = StepOutputs.empty(0.0)
                self.core.take_store_updates(step)
                self._outbox.put(step)

    def _add(self, message: _Prepared) -> None:
        request = message.request
        try:
            if message.error is not None:
                raise message.error
            self.core.add(request, grammars=message.grammars)
        except InvalidRequestError as exc:  # the front end validated; only a clash is left
            rid = request.request_id
            step = StepOutputs.empty(0.0)
            step.failed = [RequestFailure(rid, str(exc))]
            step.finished = [SequenceFinish(rid, i, "error") for i in range(request.params.n)]
            self.core.take_store_updates(step)
            self._outbox.put(step)

    def _abort(self, message: Abort) -> None:
        requests = message.requests
        if message.clients:  # a dead front end's: nobody reads their outputs any more
            requests = [*requests, *self._router.requests_of(message.clients)]
        finished = self.core.abort(requests, message.sequences, message.finished)
        step = StepOutputs.empty(0.0)
        step.finished = finished
        step.stats = self.core.stats()  # slots freed while idle must show in the gauges
        self.core.take_store_updates(step)  # an aborted request may have saved its state
        self._outbox.put(step)

    # ----- I/O threads --------------------------------------------------------------------

    def _receive(self, inputs: zmq.Socket) -> None:
        decoder = Wire().to_core
        poller = zmq.Poller()
        poller.register(inputs, zmq.POLLIN)
        while True:
            if not poller.poll(timeout=PARENT_CHECK_S * 1000):
                if os.getppid() != self._parent:  # orphaned: nobody will read our outputs
                    self._inbox.put(Shutdown())
                    return
                continue
            message = decoder.decode(inputs.recv())
            self._inbox.put(self._prepare(message) if isinstance(message, AddRequest) else message)
            if isinstance(message, Shutdown):
                return

    def _prepare(self, message: AddRequest) -> _Prepared:
        """On the input thread, beside the running step: the request decoded, its front end
        noted, and its structured-output matchers built (llguidance releases the GIL while it
        builds)."""
        request = message.to_request()
        try:
            self._router.register(request.request_id, message.client, request.params.n)
            return _Prepared(request, self.core.grammars.matchers(request.params))
        except InvalidRequestError as exc:
            return _Prepared(request, None, exc)

    def _send(self, outputs: list[zmq.Socket], control: list[zmq.Socket]) -> None:
        encoder = Wire().encoder
        while (message := self._outbox.get()) is not None:
            if isinstance(message, _ForClient):
                outputs[message.client].send(encoder.encode(message.message), copy=False)
            elif isinstance(message, StepOutputs):
                if message.stats is not None and self._age_bounds:
                    compact(message.stats, self._age_bounds)
                for socket, part in zip(outputs, self._router.split(message), strict=True):
                    socket.send(encoder.encode(part), copy=False)
            else:  # CoreFailed: every front end and the supervisor hear it
                data = encoder.encode(message)
                for socket in outputs + control:
                    socket.send(data, copy=False)
