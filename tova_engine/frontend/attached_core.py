"""A front end's handle on a core that another process supervises (`shared_core.py`).

The same contract as `CoreClient` (start, send, shutdown, ready, dead_reason, restarts, pid),
without owning the process: it binds its output address, connects to the core's input and
says `Hello`; the core answers with `CoreReady`. One thread (`core-client`) receives: step
outputs go to `on_step`; `CoreLost` (from the supervisor) or `CoreFailed` (from the core)
end the streams through `on_lost`; a restarted core's `CoreReady` moves the input socket to
the new core and calls `on_ready`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

import zmq

from tova_engine.core.messages import (
    CoreFailed,
    CoreLost,
    CoreReady,
    Hello,
    StepOutputs,
    ToCore,
    Wire,
)
from tova_engine.core.process import push_socket
from tova_engine.frontend.core_client import CoreStartError, recv_nowait
from tova_engine.frontend.shared_core import CoreAttachment

logger = logging.getLogger("tova_engine")


class AttachedCoreClient:
    def __init__(
        self,
        attachment: CoreAttachment,
        on_step: Callable[[StepOutputs], None],
        on_lost: Callable[[str], None],
        on_ready: Callable[[CoreReady], None],
        start_timeout_s: float = 600.0,
    ) -> None:
        self.attachment = attachment
        self.client = attachment.client
        self._on_step = on_step
        self._on_lost = on_lost
        self._on_ready = on_ready
        self._start_timeout_s = start_timeout_s
        self._context = zmq.Context()
        self._wire = Wire()
        self._send_lock = threading.Lock()
        self._inputs: zmq.Socket | None = None
        self._input_address: str | None = None
        self._outputs = self._context.socket(zmq.PULL)
        path = attachment.output_address.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):  # left by this front end's predecessor
            os.unlink(path)
        self._outputs.bind(attachment.output_address)
        self._stopping = False
        self.ready = False
        self.dead_reason: str | None = None
        self.restarts = 0
        self.pid: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> CoreReady:
        """Say Hello and wait for the core's CoreReady (CoreStartError if the supervisor
        gave the core up, or none came within the start timeout)."""
        if self.attachment.input_address:
            self._connect(self.attachment.input_address)
            self.send(Hello(self.client))
        deadline = time.monotonic() + self._start_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self._outputs.poll(timeout=min(left, 1.0) * 1000):
                continue
            message = self._wire.from_core.decode(self._outputs.recv())
            if isinstance(message, CoreReady):
                self._became_ready(message, first=True)
                self._thread = threading.Thread(target=self._run, name="core-client",
                                                daemon=True)
                self._thread.start()
                return message
            if isinstance(message, CoreLost) and message.final:
                raise CoreStartError(f"the engine core is gone: {message.reason}")
            if isinstance(message, CoreFailed) and message.during_startup:
                raise CoreStartError(message.message)
            # Step outputs meant for this front end's predecessor, or a core that died
            # before answering (its successor will announce itself): keep waiting.
        raise CoreStartError(
            f"no answer from the engine core within {self._start_timeout_s:.0f} s")

    def send(self, message: ToCore) -> None:
        data = self._wire.encoder.encode(message)
        with self._send_lock:
            if self._inputs is not None and not self._inputs.closed:
                with contextlib.suppress(zmq.Again):
                    self._inputs.send(data, copy=False, flags=zmq.NOBLOCK)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Detach (the core goes on serving the other front ends)."""
        self._stopping = True
        self.ready = False
        self.dead_reason = "the engine was shut down"
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._send_lock:
            if self._inputs is not None:
                self._inputs.close(linger=0)
                self._inputs = None
        self._outputs.close(linger=0)
        self._context.term()

    # ----- the client thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if not self._outputs.poll(timeout=500):
                continue
            while (frame := recv_nowait(self._outputs)) is not None:
                self._handle(self._wire.from_core.decode(frame))

    def _handle(self, message) -> None:
        if isinstance(message, StepOutputs):
            if self.ready:  # a dead core's last steps are for streams already failed
                try:
                    self._on_step(message)
                except Exception:
                    logger.exception("handling the engine core's step outputs failed")
        elif isinstance(message, CoreReady):
            self._became_ready(message, first=False)
        elif isinstance(message, CoreLost):
            self._lost(message.reason, final=message.final)
        elif isinstance(message, CoreFailed):
            self._lost(f"its loop failed: {message.message}", final=False)

    def _became_ready(self, ready: CoreReady, first: bool) -> None:
        if ready.input_address != self._input_address:
            self._connect(ready.input_address)
        elif not first and self.ready:
            return  # the same core again (an answer to a Hello sent before a restart)
        self.pid = ready.pid
        self.dead_reason = None
        if not first:
            self.restarts += 1
            logger.info("engine core ready again (pid %d)", ready.pid)
        self.ready = True
        self._on_ready(ready)

    def _lost(self, reason: str, final: bool) -> None:
        was_ready, self.ready = self.ready, False
        if final:
            self.dead_reason = reason
        if was_ready or final:
            logger.error("engine core lost: %s", reason)
            self._on_lost(reason)

    def _connect(self, address: str) -> None:
        with self._send_lock:
            if self._inputs is not None:
                self._inputs.close(linger=0)
            self._inputs = push_socket(self._context, address)
            self._input_address = address

