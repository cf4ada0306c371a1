"""The front end's handle on the engine core process: start it, talk to it, restart it.

One thread (`core-client`) receives the core's messages and watches the process: it hands
each `StepOutputs` to `on_step`, and when the process dies (killed, out of memory, a fatal
error) it calls `on_lost` at once, then starts a new core with back-off. Sends are
thread-safe. Each core generation gets fresh sockets, so nothing meant for a dead core
reaches its successor.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from tova_engine.config import EngineConfig
from tova_engine.core.messages import CoreFailed, CoreReady, Shutdown, StepOutputs, ToCore, Wire
from tova_engine.core.process import push_socket, run_core

logger = logging.getLogger("tova_engine")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Restart a dead core up to `max_attempts` times in a row, waiting `backoff_s`, then
    doubling up to `max_backoff_s`; a core that stayed up `stable_s` resets the count."""

    max_attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_s: float = 60.0


class CoreStartError(RuntimeError):
    """The core process could not start (its own error, or it died while loading)."""


def ipc_base(kind: str) -> str:
    """A fresh path prefix for ipc:// sockets, in the temporary directory."""
    return os.path.join(tempfile.gettempdir(), f"tova-{kind}-{uuid.uuid4().hex[:12]}")


class _Generation:
    """One core process and its two sockets.

    The front end connects its input socket to the core (which binds it), so sending never
    blocks: messages queue on this side while the core starts, and a dead core's queue goes
    with the socket. (A bound PUSH socket blocks while it has no peer: an abort sent after
    the core died would freeze the event loop.)

    front_ends: the output addresses of the front-end processes that share this core; then
    the core's step outputs go to them, and this side's socket hears only whether the core
    started or failed (its control address)."""

    def __init__(self, context: zmq.Context, config: EngineConfig,
                 front_ends: tuple[str, ...] = ()) -> None:
        base = ipc_base("core")
        self.paths = (f"{base}-in", f"{base}-out")
        self.input_address = f"ipc://{base}-in"
        self.inputs = push_socket(context, self.input_address)
        own = f"ipc://{base}-out"
        self.outputs = context.socket(zmq.PULL)
        self.outputs.bind(own)
        outputs, control = (list(front_ends), own) if front_ends else ([own], None)
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=run_core,
            args=(config, self.input_address, outputs, logging.getLogger().level, control),
            name="tova-engine-core",
            # A daemon dies with the front end, but may not start processes of its own: the
            # tensor-parallel ranks. Without daemon, the core still exits when its parent is
            # gone (core_process watches it) and on Shutdown.
            daemon=config.tensor_parallel_size == 1,
        )
        self.process.start()
        self.started = time.monotonic()

    def close(self, kill_after_s: float = 0.0) -> None:
        if self.inputs.closed:
            return
        self.process.join(kill_after_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.inputs.close(linger=0)
        self.outputs.close(linger=0)
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def exit_reason(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "it stopped answering"
        if code < 0:
            return f"it was killed by signal {-code}"
        return f"it exited with status {code}"


class CoreClient:
    """Starts the core process, watches it and restarts it. By default it is also the core's
    one front end (step outputs reach `on_step`); with `front_ends` (the output addresses of
    front-end processes that attach to the core: `frontend/attached_core.py`) it only
    supervises, and `on_gave_up` hears when restarts are exhausted."""

    def __init__(
        self,
        config: EngineConfig,
        on_step: Callable[[StepOutputs], None],
        on_lost: Callable[[str], None],
        on_ready: Callable[[CoreReady], None],
        restart: RestartPolicy | None = None,
        front_ends: tuple[str, ...] = (),
        on_gave_up: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.front_ends = tuple(front_ends)
        self._on_step = on_step
        self._on_lost = on_lost
        self._on_ready = on_ready
        self._on_gave_up = on_gave_up
        self.restart_policy = restart or RestartPolicy()
        self._context = zmq.Context()
        self._wire = Wire()
        self._send_lock = threading.Lock()
        self._generation: _Generation | None = None
        self._stopping = False
        self.ready = False
        self.dead_reason: str | None = None  # set once restarts are exhausted
        self.restarts = 0
        self._attempts = 0  # restarts in a row without a stable core
        self._thread: threading.Thread | None = None

    # ----- life cycle ---------------------------------------------------------------------

    def start(self) -> CoreReady:
        """Start the first core and wait until it has loaded its model (raises
        CoreStartError with the core's own message if it cannot), then watch it."""
        ready = self._start_generation()
        self._thread = threading.Thread(target=self._run, name="core-client", daemon=True)
        self._thread.start()
        return ready

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self.ready = False
        self.dead_reason = "the engine was shut down"
        self._stop_generation(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._stop_generation(timeout_s)  # one that a restart under way had started
        self._context.term()

    def _stop_generation(self, timeout_s: float) -> None:
        with self._send_lock:
            generation, self._generation = self._generation, None
        if generation is not None:
            with contextlib.suppress(zmq.Again):
                generation.inputs.send(self._wire.encoder.encode(Shutdown()), flags=zmq.NOBLOCK)
            generation.close(kill_after_s=timeout_s)

    @property
    def input_address(self) -> str | None:
        """Where the running core takes its messages (None while none runs)."""
        generation = self._generation
        return None if generation is None else generation.input_address

    @property
    def pid(self) -> int | None:
        generation = self._generation
        return None if generation is None else generation.process.pid

    def send(self, message: ToCore) -> None:
        data = self._wire.encoder.encode(message)
        with self._send_lock:
            generation = self._generation
            if generation is not None and not generation.inputs.closed:
                # Never blocks (see _Generation); Again only if the socket is being closed.
                with contextlib.suppress(zmq.Again):
                    generation.inputs.send(data, copy=False, flags=zmq.NOBLOCK)

    # ----- the client thread ----------------------------------------------------------------

    def _start_generation(self) -> CoreReady:
        generation = _Generation(self._context, self.config, self.front_ends)
        poller = zmq.Poller()
        poller.register(generation.outputs, zmq.POLLIN)
        poller.register(generation.process.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll(timeout=500))
            if self._stopping:  # shut down while this core was starting
                generation.close(kill_after_s=5)
                raise CoreStartError("the engine was shut down")
            if generation.outputs in events:
                message = self._wire.from_core.decode(generation.outputs.recv())
                if isinstance(message, CoreReady):
                    with self._send_lock:
                        self._generation = generation
                    self.ready = True
                    self._on_ready(message)
                    return message
                if isinstance(message, CoreFailed):
                    generation.close(kill_after_s=5)
                    raise CoreStartError(message.message)
            elif generation.process.sentinel in events:
                reason = generation.exit_reason()
                generation.close()
                raise CoreStartError(f"the engine core process died while starting: {reason}")

    def _run(self) -> None:
        while not self._stopping:
            reason = self._receive_until_lost()
            if self._stopping:
                return
            self.ready = False
            logger.error("engine core lost: %s", reason)
            self._on_lost(reason)
            if not self._restart():
                if self._on_gave_up is not None and not self._stopping:
                    self._on_gave_up(self.dead_reason or "restarts exhausted")
                return

    def _receive_until_lost(self) -> str:
        generation = self._generation
        poller = zmq.Poller()
        poller.register(generation.outputs, zmq.POLLIN)
        poller.register(generation.process.sentinel, zmq.POLLIN)
        while not self._stopping:
            events = dict(poller.poll(timeout=500))
            if generation.outputs in events:
                while (frame := recv_nowait(generation.outputs)) is not None:
                    message = self._wire.from_core.decode(frame)
                    if isinstance(message, StepOutputs):
                        self._hand_over(message)
                    elif isinstance(message, CoreFailed):  # it is exiting: do not wait
                        return f"its loop failed: {message.message}"
            elif generation.process.sentinel in events:
                return generation.exit_reason()
        return "shut down"

    def _hand_over(self, step: StepOutputs) -> None:
        try:
            self._on_step(step)
        except Exception:
            # The last guard of this thread: it must keep receiving and watching the core.
            logger.exception("handling the engine core's step outputs failed")

    def _restart(self) -> bool:
        policy = self.restart_policy
        old = self._generation
        stable = old is not None and time.monotonic() - old.started >= policy.stable_s
        with self._send_lock:
            self._generation = None
        if old is not None:
            old.close()
        if stable:
            self._attempts = 0
        while not self._stopping:
            if self._attempts >= policy.max_attempts:
                self.dead_reason = (
                    f"the engine core died {self._attempts + 1} times without staying up "
                    f"{policy.stable_s:.0f} s"
                )
                logger.error("%s; giving up", self.dead_reason)
                return False
            time.sleep(min(policy.backoff_s * 2**self._attempts, policy.max_backoff_s))
            self._attempts += 1
            try:
                self._start_generation()
            except CoreStartError as exc:
                logger.error("engine core restart failed: %s", exc)
                continue
            self.restarts += 1
            logger.info("engine core restarted (restart %d)", self.restarts)
            return True
        return False


def recv_nowait(socket: zmq.Socket) -> bytes | None:
    try:
        return socket.recv(zmq.NOBLOCK)
    except zmq.Again:
        return None


def load_tokenizer(ready: CoreReady):
    """The tokenizer the core loaded with its model (None when it has none)."""
    return pickle.loads(ready.tokenizer) if ready.tokenizer else None
