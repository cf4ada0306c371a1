"""A core shared by several front-end processes (`tova-serve --api-server-count N`).

The supervising process starts the core, watches it and restarts it (`CoreClient` with
`front_ends`); the front ends attach to it (`attached_core.py`), each binding its own output
address, so every step's outputs reach the process that owns the request. When the core
dies, each front end hears `CoreLost` from here and fails its own streams; a restarted core
announces itself to all of them with `CoreReady` (which names its new input address).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import zmq

from tova_engine.config import EngineConfig
from tova_engine.core.messages import Abort, CoreLost, CoreReady, StepOutputs, Wire
from tova_engine.core.process import push_socket
from tova_engine.frontend.core_client import CoreClient, RestartPolicy, ipc_base

logger = logging.getLogger("tova_engine")


@dataclass(frozen=True, slots=True)
class CoreAttachment:
    """What a front-end process needs to attach to a shared core: its index (requests carry
    it), the output address it binds, and where the core took its messages when the front
    end was started (a restarted core's `CoreReady` names the new one)."""

    client: int
    output_address: str
    input_address: str


class SharedCore:
    def __init__(self, config: EngineConfig, front_ends: int,
                 restart: RestartPolicy | None = None) -> None:
        if front_ends < 1:
            raise ValueError(f"front_ends must be at least 1; got {front_ends}")
        base = ipc_base("frontend")
        self.output_addresses = tuple(f"ipc://{base}-{i}" for i in range(front_ends))
        self._context = zmq.Context()
        self._wire = Wire()
        # The supervisor's own line to each front end (for CoreLost): connected, so sends
        # queue while a front end (re)starts and never block.
        self._notify = [push_socket(self._context, address)
                        for address in self.output_addresses]
        self._client = CoreClient(
            config, on_step=_no_steps, on_lost=self._lost, on_ready=_announced, restart=restart,
            front_ends=self.output_addresses, on_gave_up=self._gave_up,
        )

    def start(self) -> CoreReady:
        """Start the core and wait until its model is loaded (CoreStartError if it cannot)."""
        return self._client.start()

    def attachment(self, client: int) -> CoreAttachment:
        return CoreAttachment(client, self.output_addresses[client],
                              self._client.input_address or "")

    @property
    def restarts(self) -> int:
        return self._client.restarts

    @property
    def pid(self) -> int | None:
        return self._client.pid

    def abort_front_end(self, client: int) -> None:
        """Free the slots of a front end that died: its clients' connections are gone."""
        self._client.send(Abort(clients=[client]))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._client.shutdown(timeout_s)
        for socket in self._notify:
            socket.close(linger=0)
        self._context.term()

    def _lost(self, reason: str) -> None:
        self._broadcast(CoreLost(reason))

    def _gave_up(self, reason: str) -> None:
        self._broadcast(CoreLost(reason, final=True))

    def _broadcast(self, message: CoreLost) -> None:
        data = self._wire.encoder.encode(message)
        for socket in self._notify:
            with contextlib.suppress(zmq.ZMQError):
                socket.send(data, flags=zmq.NOBLOCK)


def _no_steps(step: StepOutputs) -> None:
    """The core sends its steps to the front ends, never to the supervisor."""


def _announced(ready: CoreReady) -> None:
    logger.info("engine core ready (pid %d); it serves the front ends directly", ready.pid)
