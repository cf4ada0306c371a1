"""SIGTERM: the server stops taking requests (503 in OpenAI's shape), lets the in-flight ones
finish up to --shutdown-timeout, and exits 0. Real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from tests.reliability_utils import (
    assert_openai_error,
    read_stream,
    reliable_server_args,
    with_token_logprobs,
)
from tests.server_utils import ServerProcess, auth_headers, wait_for_metric

pytest_plugins = ("tests.reliability_fixtures",)

# Each token of these requests takes 20 ms longer (the fault hook's delay): two of them are
# in flight for about 2.5 s, long enough to send the signal and knock on the door meanwhile.
SLOW = {"X-Tova-Fault": "delay:0.02"}
TOKENS = 60


def start(model: Path, log: Path, timeout_s: float) -> ServerProcess:
    args = [*reliable_server_args(model), "--shutdown-timeout", str(timeout_s)]
    return ServerProcess(args, log).wait_ready()


def wait_exit(server: ServerProcess, timeout_s: float) -> int:
    try:
        return server.process.wait(timeout_s)
    finally:
        server.stop()


async def wait_until_draining(url: str) -> httpx.Response:
    """/health turns 503 as soon as the drain starts."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        for _ in range(100):
            health = await http.get("/health")
            if health.status_code == 503:
                return health
            await asyncio.sleep(0.05)
    raise AssertionError("the server never started draining")


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_chat_model, tmp_path):
    server = start(tiny_chat_model, tmp_path / "server.log", timeout_s=60)
    url = server.url

    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=60) as http:
            body = {"prompt": "Once", "max_tokens": TOKENS, "ignore_eos": True}
            chat = with_token_logprobs("/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Once"}], "max_tokens": TOKENS,
                "ignore_eos": True, "stream": True})
            streamed = asyncio.create_task(read_stream(http, "/v1/chat/completions", chat,
                                                       headers=SLOW))
            plain = asyncio.create_task(http.post("/v1/completions", json=body, headers=SLOW))
            assert await asyncio.to_thread(wait_for_metric, url, "tova_requests_running", 2) == 2
            os.kill(server.process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            health = await wait_until_draining(url)
            assert_openai_error(health, 503, code="shutting_down")
            # New requests, on new connections, are refused while the old ones run on.
            refused = await http.post("/v1/completions", json=body)
            error = assert_openai_error(refused, 503, code="shutting_down")
            assert error["type"] == "server_error"
            assert refused.headers["connection"] == "close"
            assert not streamed.done() and not plain.done()
            result, response = await asyncio.gather(streamed, plain)
            assert result.done and result.error is None and result.tokens == {0: TOKENS}
            assert response.status_code == 200
            assert response.json()["usage"]["completion_tokens"] == TOKENS
            return signalled

    signalled = asyncio.run(run())
    finished = time.monotonic()
    assert wait_exit(server, 30) == 0
    exited = time.monotonic()
    print(f"\nSIGTERM: in-flight requests done {finished - signalled:.2f} s after the signal, "
          f"process exited 0 {exited - signalled:.2f} s after it")
    # It left once the last request was done, not at the 60 s timeout.
    assert exited - signalled < 20
    assert "drained: no request in flight" in server.log_path.read_text()


def test_shutdown_timeout_cuts_what_still_runs_and_exits_0(tiny_chat_model, tmp_path):
    server = start(tiny_chat_model, tmp_path / "server.log", timeout_s=1)
    url = server.url
    events: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=60) as http:
            # 3000 tokens at 20 ms each: a minute, far past the timeout.
            body = {"prompt": "Once", "max_tokens": 3000, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body,
                                   headers=SLOW) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                events.append(await lines.__anext__())
                os.kill(server.process.pid, signal.SIGTERM)
                try:
                    async for line in lines:
                        events.append(line)
                except httpx.RemoteProtocolError:  # the connection closed mid-response
                    events.append("cut")

    started = time.monotonic()
    asyncio.run(run())
    assert wait_exit(server, 30) == 0
    print(f"\nSIGTERM with a 1 s timeout: exited 0 {time.monotonic() - started:.2f} s after "
          "the request started")
    assert time.monotonic() - started < 20
    # The client can tell: the stream ended without [DONE] (and without a finish reason).
    assert "data: [DONE]" not in events and events[-1] == "cut"
    assert "shutdown timeout (1.0 s) reached: cutting 1 request(s)" in server.log_path.read_text()
