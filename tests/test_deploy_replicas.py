"""Two real tova-server replicas behind a real HAProxy (docker/haproxy/haproxy.cfg, its
compose `server-template` line swapped for the two loopback servers by
`benchmarks/balancers.py`): concurrent streams all
complete with their token counts, both replicas take work, and SIGTERM to one replica in the
middle of a run loses nothing: requests that had not started are retried on the other, and
the streams the drained replica was serving finish there."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.balancers import loopback_haproxy_config
from tests.server_utils import ServerProcess, free_port, scrape, tiny_config

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (.ci/run installs it)")


def replica(folder: Path, name: str) -> ServerProcess:
    return ServerProcess([
        "--model", str(tiny_config(folder)), "--load-format", "dummy", "--device", "cpu",
        "--state-size", "16", "--max-num-seqs", "16", "--shutdown-timeout", "60",
        "--disable-access-log",
    ], folder / f"{name}.log")


@pytest.fixture
def fleet(tmp_path):
    servers = [replica(tmp_path, f"replica-{i}") for i in range(2)]
    for server in servers:
        server.wait_ready()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(loopback_haproxy_config(port, [s.port for s in servers], log="stderr"))
    log = open(tmp_path / "haproxy.log", "w")  # noqa: SIM115  (closed below)
    balancer = subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # both replicas in rotation: two health checks passed ("rise 2")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                time.sleep(2.5)
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "haproxy did not come up"
        time.sleep(0.2)
    yield url, servers
    balancer.terminate()
    balancer.wait(10)
    log.close()
    for server in servers:
        server.stop()


async def stream(client: httpx.AsyncClient, max_tokens: int, started: list) -> int:
    """One streamed completion through the balancer; returns the tokens it reported."""
    body = {"prompt": [5, 6, 7, 8], "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event["choices"] and not started[0]:
                started[0] = True
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    return usage


def served(server: ServerProcess) -> float:
    """Requests the replica finished (every finish reason)."""
    return scrape(server.url).get("tova_requests_total")


def test_streams_spread_over_both_replicas(fleet):
    url, servers = fleet

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(stream(client, 24, [False]) for _ in range(64)))

    counts = asyncio.run(run())
    assert counts == [24] * 64
    per_replica = [served(server) for server in servers]
    assert all(n > 0 for n in per_replica) and sum(per_replica) == 64, per_replica


def test_sigterm_to_one_replica_loses_no_request(fleet):
    url, servers = fleet
    draining = servers[0]

    async def run():
        limits = httpx.Limits(max_connections=96)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            first = [asyncio.create_task(stream(client, 1500, [False])) for _ in range(32)]
            await asyncio.sleep(1.0)  # streams are running on both replicas
            draining.process.send_signal(signal.SIGTERM)
            # A burst while the replica drains: its /ready turns 503 at once and the
            # balancer takes it out at its next check (within a second); a request that
            # reaches it before that gets 503 and is retried on the other replica.
            later = [asyncio.create_task(stream(client, 40, [False])) for _ in range(32)]
            return await asyncio.gather(*first), await asyncio.gather(*later)

    first, later = asyncio.run(run())
    assert first == [1500] * 32  # the drained replica's streams finished
    assert later == [40] * 32  # none lost
    assert draining.process.wait(60) == 0  # it exited cleanly once its streams were done
    assert served(servers[1]) > 0
