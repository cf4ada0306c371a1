"""Faults: 100 clients that drop mid-stream, a request that fails inside the engine
(non-finite logits, injected through the X-Tova-Fault test hook), and an engine core process
that dies (SIGKILL, or a fatal error in its loop) and is restarted. See
server/http/fault_injection.py for the hook."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import create_app
from server.http.errors import APIError
from server.http.fault_injection import parse_fault
from tests.reliability_utils import (
    assert_openai_error,
    read_stream,
    reliable_server_args,
    with_token_logprobs,
)
from tests.server_utils import ServerProcess, auth_headers, scrape, wait_for_metric
from tova_engine import AsyncEngine, EngineConfig

pytest_plugins = ("tests.reliability_fixtures",)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a long story"}]
# Long enough that no request can finish before its client hangs up.
LONG = {"max_tokens": 3000, "ignore_eos": True}


def long_body(path: str, **fields) -> dict:
    prompt = {"messages": MESSAGES} if path == CHAT else {"prompt": "Once upon a time"}
    return {**prompt, **LONG, **fields}


def client(url: str, connections: int = 16) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=120, limits=limits)


# ----- clients that drop mid-stream -------------------------------------------------------

DROPPERS = 100


async def _drop_after_first_token(http: httpx.AsyncClient, path: str) -> None:
    async with http.stream("POST", path, json=long_body(path, stream=True)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            # Chat's first event (the role) goes out before the request has a slot; a token
            # proves the request was generating when its client left.
            if line.startswith("data: ") and '"role"' not in line:
                return  # leaving the block closes the connection mid-stream


def test_clients_dropping_mid_stream_free_every_slot(reliable_server):
    url = reliable_server.url
    before = scrape(url)

    async def run() -> None:
        async with client(url, DROPPERS) as http:
            # 100 clients for 64 slots: the last 36 wait for the first ones to leave.
            await asyncio.wait_for(asyncio.gather(*(
                _drop_after_first_token(http, CHAT if i % 2 else COMPLETIONS)
                for i in range(DROPPERS)
            )), timeout=120)

    started = time.monotonic()
    asyncio.run(run())
    for gauge in ("tova_state_slots_used", "tova_requests_running", "tova_requests_waiting"):
        assert wait_for_metric(url, gauge, 0) == 0, gauge
    print(f"\n{DROPPERS} dropped streams: every slot free {time.monotonic() - started:.2f} s "
          "after the first client connected")
    aborted = before.get("tova_requests_total", finished_reason="abort") + DROPPERS
    assert wait_for_metric(url, "tova_requests_total", aborted, finished_reason="abort") == aborted
    # The server goes on serving.
    assert httpx.get(f"{url}/health").status_code == 200
    out = httpx.post(f"{url}{COMPLETIONS}", headers=auth_headers(), timeout=60,
                     json={"prompt": "Hi", "max_tokens": 5, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 5


# ----- a request that fails inside the engine ---------------------------------------------

NAN_AFTER_3 = {"X-Tova-Fault": "nan-logits:3"}
GOOD_TOKENS = 1000


def test_non_finite_logits_fail_only_that_request(reliable_server):
    url = reliable_server.url
    before = scrape(url)

    async def run() -> None:
        async with client(url) as http:
            good = [asyncio.create_task(read_stream(http, path, with_token_logprobs(path, long_body(
                path, stream=True, max_tokens=GOOD_TOKENS)))) for path in (COMPLETIONS, CHAT)]
            good.append(asyncio.create_task(http.post(COMPLETIONS, json=long_body(
                COMPLETIONS, max_tokens=GOOD_TOKENS))))
            # The poisoned requests join a batch that runs the good ones.
            running = await asyncio.to_thread(wait_for_metric, url, "tova_requests_running", 3)
            assert running == 3
            bad_plain = await http.post(COMPLETIONS, headers=NAN_AFTER_3,
                                        json=long_body(COMPLETIONS))
            bad_stream = await read_stream(
                http, CHAT, with_token_logprobs(CHAT, long_body(CHAT, stream=True)),
                headers=NAN_AFTER_3)
            assert not any(task.done() for task in good), "the good requests ended too soon"
            error = assert_openai_error(bad_plain, 500, code="engine_error")
            assert error["type"] == "server_error" and "non-finite" in error["message"]
            # A stream that had started: its tokens, then an error event and [DONE].
            assert bad_stream.status == 200 and bad_stream.tokens == {0: 3}
            assert bad_stream.error["code"] == "engine_error" and bad_stream.done
            streamed_completion, streamed_chat, plain = await asyncio.gather(*good)
            for result in (streamed_completion, streamed_chat):
                assert result.done and result.error is None
                assert result.tokens == {0: GOOD_TOKENS} and result.finish == {0: "length"}
            assert plain.status_code == 200
            assert plain.json()["usage"]["completion_tokens"] == GOOD_TOKENS

    asyncio.run(run())
    assert wait_for_metric(url, "tova_state_slots_used", 0) == 0
    after = scrape(url)
    errors = after.value("tova_requests_total", finished_reason="error")
    assert errors - before.get("tova_requests_total", finished_reason="error") == 2
    assert httpx.get(f"{url}/health").status_code == 200  # the engine goes on


# ----- the engine core dies ----------------------------------------------------------------


@pytest.fixture
def doomed_server(tiny_chat_model, tmp_path) -> Iterator[ServerProcess]:
    """Its own process: its engine core will be killed."""
    server = ServerProcess(reliable_server_args(tiny_chat_model), tmp_path / "server.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def core_pid(server_pid: int) -> int:
    """The engine core: the server's child started by multiprocessing's spawn (by whichever
    of the server's threads started it: /proc lists children per thread)."""
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError(f"no engine core process under {server_pid}")


def wait_ready_status(url: str, status: int, timeout_s: float) -> float:
    """Seconds until /ready answers `status`."""
    started = time.monotonic()
    while httpx.get(f"{url}/ready", timeout=5).status_code != status:
        assert time.monotonic() - started < timeout_s, f"/ready never answered {status}"
        time.sleep(0.05)
    return time.monotonic() - started


async def _streams_then(url: str, count: int, kill) -> list:
    """`count` streaming requests; once all run, `kill()`; every stream's result."""
    async with client(url) as http:
        streams = [asyncio.create_task(read_stream(http, COMPLETIONS,
                                                   long_body(COMPLETIONS, stream=True)))
                   for _ in range(count)]
        running = await asyncio.to_thread(wait_for_metric, url, "tova_requests_running", count)
        assert running == count
        await kill(http)
        return await asyncio.wait_for(asyncio.gather(*streams), 10)


def test_killed_core_ends_streams_restarts_and_serves(doomed_server):
    url = doomed_server.url
    pid = core_pid(doomed_server.process.pid)
    before = scrape(url).value("tova_engine_restarts_total")

    async def kill(http) -> None:
        os.kill(pid, signal.SIGKILL)

    results = asyncio.run(_streams_then(url, 8, kill))
    for result in results:  # each ends with an error event, then [DONE]
        assert result.status == 200 and result.done
        assert result.error["code"] == "engine_dead" and result.error["type"] == "server_error"
    assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
    health = httpx.get(f"{url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] in ("restarting", "ok")
    back = wait_ready_status(url, 200, 120)
    print(f"\nengine core killed: restarted and ready again after {back:.1f} s")
    response = httpx.post(url + CHAT, json={"messages": MESSAGES, "max_tokens": 4},
                          headers=auth_headers(), timeout=30)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4
    assert scrape(url).value("tova_engine_restarts_total") == before + 1
    assert core_pid(doomed_server.process.pid) != pid
    assert httpx.get(f"{url}/health", timeout=5).json() == {
        "status": "ok", "engine_restarts": 1}


def test_fatal_engine_error_is_503_not_a_hang_then_recovers(doomed_server):
    url = doomed_server.url
    killed = {}

    async def kill(http) -> None:
        killed["at"] = time.monotonic()
        killer = await http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2},
                                 headers={"X-Tova-Fault": "kill-engine"})
        assert_openai_error(killer, 503, code="engine_dead")

    results = asyncio.run(_streams_then(url, 2, kill))
    print(f"\nengine core died: in-flight requests answered within "
          f"{(time.monotonic() - killed['at']) * 1000:.0f} ms")
    for result in results:
        assert result.status == 200 and result.done
        assert result.error["code"] == "engine_dead"
    # While the core restarts, requests are refused at once, not queued.
    if httpx.get(f"{url}/ready", timeout=5).status_code == 503:
        started = time.monotonic()
        response = httpx.post(url + CHAT, json={"messages": MESSAGES},
                              headers=auth_headers(), timeout=10)
        if response.status_code != 200:  # unless the core came back in between
            assert_openai_error(response, 503, code="engine_dead")
            assert time.monotonic() - started < 5
    wait_ready_status(url, 200, 120)
    assert "engine core lost" in doomed_server.log()
    assert "X-Tova-Fault: kill-engine" in doomed_server.log()
    response = httpx.post(url + COMPLETIONS, json={"prompt": "Hi", "max_tokens": 3},
                          headers=auth_headers(), timeout=30)
    assert response.status_code == 200
    # What does not need the engine still answers, and the process still stops cleanly.
    assert httpx.get(f"{url}/metrics").status_code == 200
    doomed_server.stop()
    assert doomed_server.process.returncode == 0


# ----- the hook itself ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["bogus", "nan-logits:x", "nan-logits:-1", "kill-engine:1",
                                   "delay", "delay:inf"])
def test_unknown_fault_is_400(value):
    with pytest.raises(APIError) as info:
        parse_fault(value)
    assert info.value.status == 400 and "X-Tova-Fault" in info.value.message


def test_fault_header_is_ignored_without_the_flag(tiny_llama):
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama), device="cpu", state_size=8,
                                      max_num_seqs=2))
    try:
        app = create_app(engine)  # no --enable-fault-injection

        async def run() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                return await http.post(COMPLETIONS, headers={"X-Tova-Fault": "kill-engine"},
                                       json={"prompt": [3, 4], "max_tokens": 3})

        response = asyncio.run(run())
        assert response.status_code == 200 and engine.is_ready
    finally:
        engine.shutdown()
