"""Under load: a soak of mixed requests at 64 concurrency (every one right, slots back to 0,
memory flat), and overload (429 with Retry-After past --max-queue-len; what was accepted
finishes; nothing hangs).

The soak runs at a reduced size here; `TOVA_SOAK=1` runs the full 1,000 requests
(`TOVA_SOAK_MODEL=default` against the embedded SmolLM2 instead of the tiny model). Its figures
are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import httpx
import pytest

from server.http.sse import sse
from server.protocol.common import ErrorInfo, ErrorResponse
from tests.reliability_utils import (
    assert_openai_error,
    read_stream,
    reliable_server_args,
    rss_bytes,
    with_token_logprobs,
)
from tests.server_utils import ServerProcess, auth_headers, scrape, wait_for_metric
from tests.soak import make_requests, run_soak

pytest_plugins = ("tests.server_fixtures", "tests.reliability_fixtures")

CONCURRENCY = 64
FULL_SOAK = os.environ.get("TOVA_SOAK") == "1"
SOAK_REQUESTS = 1000 if FULL_SOAK else 256
WARMUP_REQUESTS = 256 if FULL_SOAK else 128
# RSS after the run may differ from RSS after warm-up by at most this share.
RSS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def soak_server(tiny_chat_model, tmp_path_factory) -> Iterator[ServerProcess]:
    """A fresh process, so its memory is the soak's alone."""
    args = reliable_server_args(tiny_chat_model)
    model = os.environ.get("TOVA_SOAK_MODEL")
    if model is not None:
        args[1] = model
        if model == "default":  # the embedded SmolLM2: no --model at all
            args = args[2:]
    server = ServerProcess(args, tmp_path_factory.mktemp("soak") / "server.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.mark.soak
def test_soak(soak_server, capsys):
    url = soak_server.url
    warmup = asyncio.run(run_soak(url, make_requests(WARMUP_REQUESTS, seed=1), CONCURRENCY,
                                  auth_headers()))
    assert not warmup.failures, warmup.failures[:5]
    assert wait_for_metric(url, "tova_state_slots_used", 0) == 0
    rss_warm = rss_bytes(soak_server.process.pid)

    report = asyncio.run(run_soak(url, make_requests(SOAK_REQUESTS, seed=2), CONCURRENCY,
                                  auth_headers()))
    assert not report.failures, report.failures[:5]
    for gauge in ("tova_state_slots_used", "tova_requests_running", "tova_requests_waiting"):
        assert wait_for_metric(url, gauge, 0) == 0, gauge
    rss_after = rss_bytes(soak_server.process.pid)
    with capsys.disabled():
        print(f"\nsoak: {report.summary()}; RSS after warm-up {rss_warm / 2**20:.1f} MiB, "
              f"after the run {rss_after / 2**20:.1f} MiB "
              f"({(rss_after - rss_warm) / rss_warm:+.2%})")
    assert abs(rss_after - rss_warm) <= RSS_TOLERANCE * rss_warm
    metrics = scrape(url)
    assert metrics.value("tova_requests_total", finished_reason="abort") == 0
    assert metrics.value("tova_requests_total", finished_reason="error") == 0


# ----- overload: the tiny server has one slot and a queue of one --------------------------

BURST = 24
ONE = {"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True}


async def _burst(url: str) -> list[tuple[int, object]]:
    """BURST requests at once, half of them streamed: (status, result) each."""
    limits = httpx.Limits(max_connections=BURST)

    async def one(client: httpx.AsyncClient, index: int) -> tuple[int, object]:
        if index % 2:
            body = with_token_logprobs("/v1/completions", {**ONE, "stream": True})
            result = await read_stream(client, "/v1/completions", body)
            return result.status, result
        response = await client.post("/v1/completions", json=ONE)
        return response.status_code, response

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        # Nothing may hang: the whole burst has a deadline.
        return await asyncio.wait_for(
            asyncio.gather(*(one(client, i) for i in range(BURST))), timeout=120)


def test_overload_refuses_with_429_and_finishes_what_it_accepted(tiny_server):
    url = tiny_server.url
    results = asyncio.run(_burst(url))
    accepted = [result for status, result in results if status == 200]
    refused = [result for status, result in results if status == 429]
    assert len(accepted) + len(refused) == BURST
    assert accepted and refused
    print(f"\noverload: {BURST} at once, {len(accepted)} accepted, {len(refused)} got 429")
    for result in accepted:
        if isinstance(result, httpx.Response):
            assert result.json()["usage"]["completion_tokens"] == ONE["max_tokens"]
        else:
            assert result.done and result.tokens == {0: ONE["max_tokens"]}
    for result in refused:
        if isinstance(result, httpx.Response):
            error = assert_openai_error(result, 429, code="queue_full")
            assert error["type"] == "rate_limit_error"
            assert result.headers["retry-after"] == "1"
        else:
            assert result.error["code"] == "queue_full"
    for gauge in ("tova_state_slots_used", "tova_requests_waiting", "tova_requests_running"):
        assert wait_for_metric(url, gauge, 0) == 0, gauge


def test_stream_events_survive_unicode_line_splitters():
    """The soak found it: a token that decodes to U+0085 or U+2028 cut an event in two for
    clients that split lines as Python does (httpx's iter_lines). They go out escaped."""
    chunk = ErrorResponse(error=ErrorInfo(message="a\x85b\u2028c\u2029d é", type="t"))
    line = sse(chunk).removesuffix("\n\n")
    assert line.splitlines() == [line]
    assert json.loads(line.removeprefix("data: "))["error"]["message"] == chunk.error.message
