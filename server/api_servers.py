"""`tova-serve --api-server-count N`: N front-end processes share one engine core.

One front-end process (event loop, tokenizer, detokenizer, SSE writing) tops out at a few
thousand tokens a second of streaming; the core can produce many more. Here the supervising
process (this one) starts the core (`SharedCore`: it restarts it if it dies), holds the port,
and starts N front ends, each an `AsyncEngine` attached to the core with the app of
`server/app.py`, each listening on the port with SO_REUSEPORT (the kernel spreads new
connections over them evenly; without it they accept on one shared socket). The core sends
each step's outputs to the process that owns the request; metrics are one view through
prometheus_client's multiprocess files; stored responses are files every front end reads.

A front end that dies is started again (its streams end with the connection; the others go
on); one that cannot start at all (a setting the app refuses) stops the server. SIGTERM or
SIGINT here is passed on as SIGTERM: each front end drains as with one
(server/http/graceful.py), then the core stops. The front ends run in their own process
group, so a terminal's Ctrl-C reaches them once, through here; and each exits (draining)
when this process is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from types import FrameType

from server.serve import log_resolved, serve
from server.settings import ServerSettings
from tova_engine import AsyncEngine, EngineConfig
from tova_engine.execution.threads import usable_cpus
from tova_engine.frontend.core_client import CoreStartError
from tova_engine.frontend.shared_core import CoreAttachment, SharedCore

logger = logging.getLogger("server")
# A front end that exits with this cannot start with these settings: restarting is useless.
EXIT_CANNOT_START = 78
# A front end that keeps dying waits longer before each new start, up to this.
MAX_RESTART_BACKOFF_S = 30.0
# A front end up this long has its back-off forgotten.
STABLE_S = 60.0
# Each front end listens on its own socket and the kernel spreads new connections over them
# evenly. (Accepting on one shared socket, whichever process wakes first takes the
# connection: on Linux one process took all 24 of a burst in a test.)
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def serve_many(config: EngineConfig, settings: ServerSettings) -> None:
    """Run the core and `settings.front_ends` front ends until a signal stops them."""
    count = settings.front_ends
    cores = usable_cpus()
    if count > cores:
        logger.warning("--api-server-count %d is more than the %d CPU cores here: the front "
                       "ends will compete with the engine core for them", count, cores)
    shared_dir = tempfile.mkdtemp(prefix="tova-frontends-")
    metrics_dir = os.path.join(shared_dir, "metrics")
    os.mkdir(metrics_dir)
    # Read by prometheus_client when a front end imports it (a spawned process inherits it).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if settings.responses_dir is None and config.state_store_dir is None:
        settings = dataclasses.replace(settings,
                                       responses_dir=os.path.join(shared_dir, "responses"))
    core = SharedCore(config, count)
    try:
        logger.info("starting the engine core process (model %s) for %d front ends",
                    config.model or "embedded", count)
        core.start()
        listener = _listen(settings.host, settings.port)
        FrontEnds(config, settings, core, listener).run()
    except CoreStartError as exc:
        sys.exit(f"tova-serve: error: {exc}")
    finally:
        core.shutdown()
        shutil.rmtree(shared_dir, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    """The supervisor's hold on the port. Where the kernel balances connections over
    listeners sharing a port (SO_REUSEPORT: Linux), it only binds (a bound socket that does
    not listen takes no connections) and each front end listens on a socket of its own;
    else it listens, and the front ends accept on this one socket."""
    try:
        return _bound(host, port, listen=not REUSE_PORT)
    except OSError as exc:
        logger.error("could not bind %s:%d: %s", host, port, exc)
        sys.exit(3)


def _bound(host: str, port: int, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if REUSE_PORT:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class FrontEnds:
    """Starts the front-end processes, restarts the ones that die, stops them on a signal."""

    def __init__(self, config: EngineConfig, settings: ServerSettings, core: SharedCore,
                 listener: socket.socket) -> None:
        count = settings.front_ends
        self.config = config
        self.settings = settings
        self.core = core
        self.listener = listener
        self._spawn = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.Process | None] = [None] * count
        self._started_at = [0.0] * count
        self._failures = [0] * count
        self._stopping = False

    def run(self) -> None:
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(len(self._processes)):
                self._start(index)
            self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_all()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._stopping:  # a second signal: cut the drain short
            self._signal_all(signal.SIGKILL)
            return
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    def _start(self, index: int) -> None:
        process = self._spawn.Process(
            target=run_front_end, name=f"tova-frontend-{index}",
            # With SO_REUSEPORT each front end listens on a socket of its own.
            args=(self.config, self.settings, self.core.attachment(index),
                  None if REUSE_PORT else self.listener, logging.getLogger().level),
        )
        process.start()
        self._processes[index] = process
        self._started_at[index] = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping:
            alive = [p for p in self._processes if p is not None]
            wait([p.sentinel for p in alive], timeout=0.5)
            for index, process in enumerate(self._processes):
                if process is None or process.is_alive() or self._stopping:
                    continue
                self._restart(index, process)
            if all(p is None for p in self._processes):
                return

    def _restart(self, index: int, process: multiprocessing.Process) -> None:
        code = process.exitcode
        _mark_dead(process.pid)
        self.core.abort_front_end(index)
        if code == EXIT_CANNOT_START:
            logger.error("front end %d could not start; stopping the server", index)
            self._processes[index] = None
            self._stopping = True
            self._signal_all(signal.SIGTERM)
            return
        if time.monotonic() - self._started_at[index] >= STABLE_S:
            self._failures[index] = 0
        delay = min(2.0 ** self._failures[index] - 1, MAX_RESTART_BACKOFF_S)
        self._failures[index] += 1
        logger.error("front end %d (pid %s) exited with status %s; starting it again in "
                     "%.0f s", index, process.pid, code, delay)
        time.sleep(delay)
        if not self._stopping:
            self._start(index)

    def _signal_all(self, sig: int) -> None:
        for process in self._processes:
            if process is not None and process.is_alive():
                os.kill(process.pid, sig)

    def _stop_all(self) -> None:
        """Wait for the front ends to drain (they got the signal), then make sure."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + 10.0
        for process in self._processes:
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
            _mark_dead(process.pid)


def _exit_with_parent() -> None:
    """Drain and exit (as on SIGTERM) once the supervisor is gone: nobody would restart the
    core or this process any more."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _mark_dead(pid: int | None) -> None:
    """Its live gauges leave the metrics view (its counters stay: they happened)."""
    if pid is None:
        return
    from prometheus_client import multiprocess  # after PROMETHEUS_MULTIPROC_DIR is set

    multiprocess.mark_process_dead(pid)


def run_front_end(config: EngineConfig, settings: ServerSettings, attachment: CoreAttachment,
                  listener: socket.socket | None, log_level: int) -> None:
    """A front-end process: attach to the core, then serve the app on the shared socket
    (`listener`) or, with SO_REUSEPORT (None), on one of its own."""
    os.setpgrp()  # signals come through the supervisor (see the module's docstring)
    _exit_with_parent()
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s %(name)s [frontend {attachment.client}]: "
               "%(message)s")
    try:
        engine = AsyncEngine(config, attach=attachment)
    except ValueError as exc:  # the core is gone for good
        logger.error("%s", exc)
        sys.exit(1)
    if listener is None:  # a listening socket of its own, once it can serve
        listener = _bound(settings.host, settings.port, listen=True)
    try:
        if attachment.client == 0:
            log_resolved(engine, settings)
        serve(engine, settings, sockets=[listener])
    except ValueError as exc:  # a setting the app cannot honour for this model
        logger.error("%s", exc)
        sys.exit(EXIT_CANNOT_START)
    finally:
        engine.shutdown()
