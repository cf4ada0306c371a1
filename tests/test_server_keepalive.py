"""Keep-alive connections: no request is lost to the server's idle timer, even while the event
loop stalls (docs/serving.md, "Keep-alive").

The servers here run a thread that holds the GIL for a second or more at a time, as the engine
thread did: a `sitecustomize` on the server's PYTHONPATH calls libc's poll() through
ctypes.PyDLL, which keeps the GIL for the whole call. With uvicorn's stock timer and its old 5 s
default, requests that reached the server during such a stall, on a connection whose idle
deadline passed before the stall ended, were cut with a reset and no response byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from server.cli import build_parser, configs
from server.settings import DEFAULT_TIMEOUT_KEEP_ALIVE_S, ServerSettings
from tests.server_utils import ServerProcess, tiny_config

STALLER = """
import ctypes, os, random, threading, time

_libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the call


def _stall(path):
    # Waits for "HOLD MEAN_GAP" in the file (written once the server is up), then holds the
    # GIL for HOLD seconds, at random gaps of MEAN_GAP seconds on average.
    while not os.path.exists(path):
        time.sleep(0.01)
    hold, gap = (float(x) for x in open(path).read().split())
    rng = random.Random()
    while True:
        _libc.poll(None, 0, int(hold * 1000))
        time.sleep(rng.uniform(0, 2 * gap))


# Popped, so that processes the server starts do not stall too.
_path = os.environ.pop("TOVA_TEST_GIL_STALL", None)
if _path:
    threading.Thread(target=_stall, args=(_path,), daemon=True).start()
"""


def _serve(folder: Path, args: list[str], stalls: str) -> Iterator[ServerProcess]:
    """A tiny-model server that stalls as `stalls` ("HOLD MEAN_GAP") says once it is up."""
    (folder / "sitecustomize.py").write_text(STALLER)
    trigger = folder / "stalls"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (
            str(folder), os.environ.get("PYTHONPATH")))))
        patch.setenv("TOVA_TEST_GIL_STALL", str(trigger))
        server = ServerProcess([
            "--model", str(tiny_config(folder)), "--load-format", "dummy", "--device", "cpu",
            "--state-size", "16", "--max-num-seqs", "64", "--disable-access-log", *args,
        ], folder / "server.log")
    try:
        server.wait_ready()
        trigger.write_text(stalls)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """Default keep-alive settings; the GIL held for 1 s at a time, every 1.5 s on average."""
    yield from _serve(tmp_path_factory.mktemp("default"), [], "1.0 1.5")


@pytest.fixture(scope="module")
def short_keepalive_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """A 2 s keep-alive timeout; the GIL held for 1.5 s at a time, every 2 s on average."""
    yield from _serve(tmp_path_factory.mktemp("short"), ["--timeout-keep-alive", "2"], "1.5 2.0")


# ----- many clients reusing their connections -----------------------------------------------


async def _one(client: httpx.AsyncClient, body: dict) -> tuple[str | None, int]:
    """(why the response is not a complete, valid one, or None; the local port used)."""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {(await response.aread())[:200]!r}", port
        if body["stream"]:
            lines = [line async for line in response.aiter_lines() if line]
            if not lines or lines[-1] != "data: [DONE]":
                return f"stream not ended by [DONE]: {lines[-2:]}", port
            events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
            finish = next((e["choices"][0]["finish_reason"] for e in reversed(events)
                           if e["choices"]), None)
            usage = events[-1]["usage"]
        else:
            result = json.loads(await response.aread())
            finish, usage = result["choices"][0]["finish_reason"], result["usage"]
    if finish != "length" or usage["completion_tokens"] != body["max_tokens"]:
        return f"incomplete: finish {finish}, usage {usage}", port
    return None, port


class Plan(NamedTuple):
    requests: int
    clients: int
    gaps_per_client: int
    gap_s: tuple[float, float]


async def _client(url: str, model: str, plan: Plan, worker: int,
                  count: int) -> tuple[list[str], int]:
    """`count` requests over one connection at a time, with idle gaps; returns the failures
    and how many gaps the connection survived (the same local port before and after)."""
    rng = random.Random(worker)
    gaps_after = set(rng.sample(range(count - 1), plan.gaps_per_client))
    failures, reused, port = [], 0, None
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=1)) as client:
        for i in range(count):
            body = {"model": model, "prompt": [rng.randrange(3, 120) for _ in range(4)],
                    "max_tokens": rng.randint(1, 4), "ignore_eos": True, "stream": i % 2 == 0,
                    "stream_options": {"include_usage": True} if i % 2 == 0 else None}
            sent = time.monotonic()
            try:
                failure, new_port = await _one(client, body)
            except httpx.HTTPError as exc:
                failure, new_port = f"{exc!r} after {time.monotonic() - sent:.2f} s", None
            if failure:
                failures.append(f"client {worker} request {i}: {failure}")
            reused += (i - 1 in gaps_after) and new_port == port
            port = new_port
            if i in gaps_after:
                await asyncio.sleep(rng.uniform(*plan.gap_s))
    return failures, reused


async def _load(url: str, plan: Plan) -> tuple[list[str], int]:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    counts = [plan.requests // plan.clients + (i < plan.requests % plan.clients)
              for i in range(plan.clients)]
    results = await asyncio.gather(*(
        _client(url, model, plan, i, n) for i, n in enumerate(counts)))
    return [f for failures, _ in results for f in failures], sum(r for _, r in results)


def _check(url: str, plan: Plan) -> None:
    failures, reused = asyncio.run(_load(url, plan))
    assert not failures, (f"{len(failures)} of {plan.requests} lost:\n"
                          + "\n".join(failures[:10]))
    # The test means something only if connections did carry requests across the gaps.
    assert reused >= plan.clients * plan.gaps_per_client // 4


@pytest.mark.parametrize("requests", [
    pytest.param(1000, id="1000"),
    # The gaps, not the requests, set the time (about 30 s either way): the larger run is
    # the soak's (TOVA_SOAK=1, docs/reliability.md).
    pytest.param(3000, id="3000", marks=[pytest.mark.slow, pytest.mark.skipif(
        os.environ.get("TOVA_SOAK") != "1", reason="TOVA_SOAK=1 runs it")]),
])
def test_no_request_lost_on_reused_connections(default_server, requests):
    """Idle gaps around 5 s (uvicorn's old timeout; httpx reuses a connection idle for less
    than its keepalive_expiry, also 5 s, and opens a new one after more)."""
    _check(default_server.url, Plan(requests, clients=48, gaps_per_client=5, gap_s=(4.2, 5.3)))


def test_no_request_lost_when_the_timer_comes_due_during_a_stall(short_keepalive_server):
    """A 2 s timeout and gaps of at most 1.7 s: only a stall can delay a request past its
    connection's deadline; the timer must then leave the connection to the request."""
    _check(short_keepalive_server.url,
           Plan(480, clients=24, gaps_per_client=8, gap_s=(0.8, 1.7)))


def test_idle_connection_closes_after_the_timeout(short_keepalive_server):
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", short_keepalive_server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        sock.settimeout(30)
        response = b""
        while not response.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, "closed before the response ended"
            response += chunk
        assert response.startswith(b"HTTP/1.1 200 ")
        idle = time.monotonic()
        assert sock.recv(1) == b""  # the server's FIN
        # 2 s, plus up to one 1.5 s stall
        assert 1.5 < time.monotonic() - idle < 6


def test_keep_alive_flag_and_default():
    _, settings = configs(build_parser().parse_args([]))
    assert settings.timeout_keep_alive_s == DEFAULT_TIMEOUT_KEEP_ALIVE_S > 5  # httpx's expiry
    _, settings = configs(build_parser().parse_args(["--timeout-keep-alive", "2.5"]))
    assert settings.timeout_keep_alive_s == 2.5
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="timeout_keep_alive_s"):
            ServerSettings(timeout_keep_alive_s=bad)
