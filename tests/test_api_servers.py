"""`--api-server-count 2`: two front-end processes share one engine core and one port. Real
processes on a loopback port: every stream gets every token, /metrics is one view whichever
process answers, the key and /ready hold on both, a killed front end comes back (its streams
end, the others go on, its requests leave the core), and SIGTERM drains both."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.reliability_utils import read_stream, reliable_server_args, with_token_logprobs
from tests.server_utils import (
    Metrics,
    ServerProcess,
    auth_headers,
    scrape,
    wait_for_metric,
    wait_until,
)

pytest_plugins = ("tests.reliability_fixtures",)

STREAMS = 200
TOKENS = 8


def started_front_ends(server: ServerProcess) -> list[int]:
    """The pids of the front-end processes started so far (uvicorn logs each)."""
    return [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", server.log())]


@pytest.fixture(scope="module")
def two_front_ends(tiny_chat_model, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("frontends") / "server.log"
    server = ServerProcess([*reliable_server_args(tiny_chat_model), "--api-server-count", "2",
                            "--shutdown-timeout", "60"], log)
    try:
        server.wait_ready()
        wait_until(lambda: len(started_front_ends(server)) == 2, 60, "both front ends")
        yield server
    finally:
        server.stop()


def scrapes(url: str, count: int = 8) -> list[Metrics]:
    """Several scrapes on new connections: the kernel hands them to either front end."""
    return [scrape(url) for _ in range(count)]


def test_200_streams_over_two_front_ends_get_every_token_and_one_metrics_view(two_front_ends):
    url = two_front_ends.url
    before = scrape(url)

    async def run() -> list:
        limits = httpx.Limits(max_connections=STREAMS)
        async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=120,
                                     limits=limits) as http:
            body = with_token_logprobs("/v1/completions", {
                "prompt": "Once upon a time", "max_tokens": TOKENS, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}})
            return await asyncio.gather(*(read_stream(http, "/v1/completions", body)
                                          for _ in range(STREAMS)))

    results = asyncio.run(run())
    for result in results:
        assert result.status == 200 and result.error is None and result.done
        assert result.tokens == {0: TOKENS} and result.finish == {0: "length"}
        assert result.usage["completion_tokens"] == TOKENS
    # Both processes served some of them (each logs the requests it served).
    log = two_front_ends.log()
    for index in (0, 1):
        assert re.search(rf"\[frontend {index}\]: request_id=cmpl-\S+ method=POST", log), index

    def delta(metrics: Metrics, name: str, **labels: str) -> float:
        return metrics.get(name, **labels) - before.get(name, **labels)

    wait_until(lambda: scrape(url).get("tova_requests_running") == 0, 10, "the slots to free")
    for metrics in scrapes(url):
        # The requests each process counted, summed; the engine's counters counted once.
        assert delta(metrics, "tova_requests_total", finished_reason="length") == STREAMS
        assert delta(metrics, "tova_http_requests_total", route="/v1/completions",
                     status="200") == STREAMS
        assert delta(metrics, "tova_request_generation_tokens_count") == STREAMS
        assert delta(metrics, "tova_generation_tokens_total") == STREAMS * TOKENS
        assert metrics.value("tova_state_slots_capacity") == 64
        assert metrics.value("tova_requests_running") == 0
        assert metrics.value("tova_requests_waiting") == 0
        assert metrics.value("tova_engine_info") == 1


def test_the_key_and_ready_hold_on_every_front_end(two_front_ends):
    url = two_front_ends.url
    for _ in range(12):  # new connections: both processes answer some
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                             timeout=10)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        served = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                            headers=auth_headers(), timeout=30)
        assert served.status_code == 200, served.text


def test_a_killed_front_end_comes_back_and_the_other_goes_on(two_front_ends):
    server, url = two_front_ends, two_front_ends.url
    victim = started_front_ends(server)[0]
    streams = 24
    # Long, slow streams: the core sleeps a little for each of their tokens.
    body = {"prompt": "Once", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    slow = {"X-Tova-Fault": "delay:0.002", **auth_headers()}

    async def one(http: httpx.AsyncClient, killed: asyncio.Event) -> str:
        try:
            async with http.stream("POST", "/v1/completions", json=body,
                                   headers=slow) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                await lines.__anext__()
                await killed.wait()
                read = 0
                async for line in lines:  # a survivor streams on after the kill
                    read += line.startswith("data: ")
                    if read == 10:
                        return "survived"
                return "ended"
        except (httpx.RemoteProtocolError, httpx.ReadError):
            return "cut"

    async def run() -> list[str]:
        killed = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=streams)) as http:
            tasks = [asyncio.create_task(one(http, killed)) for _ in range(streams)]
            assert await asyncio.to_thread(wait_for_metric, url, "tova_requests_running",
                                           streams, 30) == streams
            os.kill(victim, signal.SIGKILL)
            killed.set()
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(run())
    # The streams of the killed process ended with their connection; the others went on.
    assert outcomes.count("cut") >= 1 and outcomes.count("survived") >= 1, outcomes
    assert outcomes.count("cut") + outcomes.count("survived") == streams, outcomes
    # The killed process's requests left the core (else they would run 3,000 tokens), the
    # survivors' went when their clients closed.
    assert wait_for_metric(url, "tova_requests_running", 0, 20) == 0
    wait_until(lambda: len(started_front_ends(server)) == 3, 60, "the front end's restart")
    assert "front end 0 (pid" in server.log() or "front end 1 (pid" in server.log()
    for _ in range(12):
        served = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                            headers=auth_headers(), timeout=30)
        assert served.status_code == 200, served.text


def test_sigterm_drains_both_front_ends_and_exits_0(two_front_ends):
    """Last in this module: it stops the module's server."""
    server, url = two_front_ends, two_front_ends.url
    tokens = 40
    body = {"prompt": "Once", "max_tokens": tokens, "ignore_eos": True, "stream": True}

    async def run() -> list:
        async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=60) as http:
            slow = {"X-Tova-Fault": "delay:0.01"}
            tasks = [asyncio.create_task(read_stream(http, "/v1/completions", body,
                                                     headers=slow)) for _ in range(6)]
            assert await asyncio.to_thread(wait_for_metric, url, "tova_requests_running",
                                           6, 30) == 6
            os.kill(server.process.pid, signal.SIGTERM)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert all(r.done and r.error is None and r.tokens == {0: tokens} for r in results)
    assert server.process.wait(30) == 0
    # Both front ends drained (the one restarted by the test before too).
    assert server.log().count("drained: no request in flight") == 2
