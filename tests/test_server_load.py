"""Many clients at once, clients that hang up, and /metrics counting exactly what was sent."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.server_utils import SMOL_NAMES, auth_headers, scrape, wait_for_metric

pytest_plugins = ("tests.server_fixtures",)

NUM_CLIENTS = 32
PROMPTS = [f"Request number {i} asks about" for i in range(NUM_CLIENTS)]


async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {"model": SMOL_NAMES[0], "prompt": prompt, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage, finish = 0, None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["choices"]:
                chunks += 1
                finish = event["choices"][0]["finish_reason"] or finish
            else:
                usage = event["usage"]
    return {"chunks": chunks, "usage": usage, "finish": finish}


async def many_streams(url: str, max_tokens: list[int]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=300) as client:
        return await asyncio.gather(*(
            stream_completion(client, prompt, n)
            for prompt, n in zip(PROMPTS, max_tokens, strict=True)
        ))


def prompt_lengths(url: str) -> list[int]:
    return [httpx.post(f"{url}/tokenize", json={"prompt": p}).json()["count"] for p in PROMPTS]


def test_concurrent_streams_complete_and_metrics_count_exactly(smol_server):
    url = smol_server.url
    max_tokens = [4 + i % 5 for i in range(NUM_CLIENTS)]  # 4..8 tokens, all different waves
    lengths = prompt_lengths(url)
    before = scrape(url)
    results = asyncio.run(many_streams(url, max_tokens))
    for result, wanted, length in zip(results, max_tokens, lengths, strict=True):
        assert result["chunks"] == wanted and result["finish"] == "length"
        # The state (S = 128) read the prompt and all but the last token, and held 128.
        evicted = {"state_size": 128, "prompt_tokens_evicted": max(0, length - 128),
                   "tokens_evicted": max(0, length + wanted - 1 - 128)}
        assert result["usage"] == {"prompt_tokens": length, "completion_tokens": wanted,
                                   "total_tokens": length + wanted,
                                   "prompt_tokens_details": {"cached_tokens": 0},
                                   "state_details": evicted}
    assert wait_for_metric(url, "tova_state_slots_used", 0) == 0
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.get(name, **labels)

    assert moved("tova_prompt_tokens_total") == sum(lengths)
    assert moved("tova_generation_tokens_total") == sum(max_tokens)
    assert moved("tova_requests_total", finished_reason="length") == NUM_CLIENTS
    assert moved("tova_requests_total", finished_reason="abort") == 0
    assert moved("tova_http_requests_total", route="/v1/completions", status="200") == NUM_CLIENTS
    assert moved("tova_time_to_first_token_seconds_count") == NUM_CLIENTS
    assert moved("tova_e2e_request_latency_seconds_count") == NUM_CLIENTS
    assert moved("tova_request_queue_time_seconds_count") == NUM_CLIENTS
    assert moved("tova_request_prompt_tokens_sum") == sum(lengths)
    assert moved("tova_request_generation_tokens_sum") == sum(max_tokens)
    # Every token after a choice's first has an inter-token latency.
    assert moved("tova_inter_token_latency_seconds_count") == sum(n - 1 for n in max_tokens)
    # 8 slots for 32 clients: some waited, and no step ran more than 8 sequences.
    assert moved("tova_batch_size_count") == moved("tova_step_duration_seconds_count")
    assert after.value("tova_batch_size_bucket", le="8.0") == after.value(
        "tova_batch_size_count")
    assert after.value("tova_state_slots_capacity") == 8


def test_metrics_families_and_labels(smol_server):
    metrics = scrape(smol_server.url)
    expected = {
        "tova_requests_running": "gauge", "tova_requests_waiting": "gauge",
        "tova_state_slots_used": "gauge", "tova_state_slots_capacity": "gauge",
        "tova_state_memory_bytes": "gauge", "tova_engine_info": "gauge",
        "tova_prompt_tokens": "counter", "tova_generation_tokens": "counter",
        "tova_requests": "counter", "tova_evicted_tokens": "counter",
        "tova_http_requests": "counter",
        "tova_time_to_first_token_seconds": "histogram",
        "tova_inter_token_latency_seconds": "histogram",
        "tova_e2e_request_latency_seconds": "histogram",
        "tova_request_queue_time_seconds": "histogram",
        "tova_request_prompt_tokens": "histogram",
        "tova_request_generation_tokens": "histogram",
        "tova_step_duration_seconds": "histogram", "tova_batch_size": "histogram",
        "tova_evicted_token_age_tokens": "histogram",
        "tova_http_request_duration_seconds": "histogram",
    }
    for name, kind in expected.items():
        family = metrics.families[name]
        assert family.type == kind, name
        assert all(s.labels.get("model_name") == SMOL_NAMES[0] for s in family.samples), name
    phases = {s.labels.get("phase") for s in metrics.families["tova_step_duration_seconds"].samples}
    assert phases == {"prefill", "decode"}
    # 30 layers x 3 KV heads x 64 dims x (K + V) x 128 entries x 4 bytes, per slot.
    assert metrics.value("tova_state_memory_bytes") >= 8 * 5898240
    info = metrics.families["tova_engine_info"].samples[0].labels
    assert info["policy"] == "tova" and info["state_size"] == "128"
    assert info["quantization"] == "none" and info["kv_cache_dtype"] == "auto"


def test_evictions_are_counted_with_their_ages(client, smol_server):
    url = smol_server.url
    before = scrape(url)
    # 150 prompt tokens through a 128-entry state: 22 evictions per layer in prefill (one
    # chunk), then one per generated token that enters the state (the last never does).
    prompt = " ".join(["word"] * 150)
    out = client.completions.create(model=SMOL_NAMES[0], prompt=prompt, max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    n_prompt = out.usage.prompt_tokens
    after = scrape(url)
    evicted = (after.value("tova_evicted_tokens_total")
               - before.value("tova_evicted_tokens_total"))
    assert evicted == 30 * (n_prompt + 5 - 1 - 128)
    ages = (after.value("tova_evicted_token_age_tokens_count")
            - before.value("tova_evicted_token_age_tokens_count"))
    assert ages == evicted
    assert after.value("tova_evicted_token_age_tokens_bucket", le="+Inf") == after.value(
        "tova_evicted_token_age_tokens_count")


def test_dropped_stream_frees_its_slot(smol_server):
    url = smol_server.url
    before = scrape(url).value("tova_requests_total", finished_reason="abort")
    body = {"model": SMOL_NAMES[0], "prompt": "Tell me a long story", "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth_headers(),
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert scrape(url).value("tova_state_slots_used") == 1
    # The connection is closed mid-stream: the request is aborted and its slot freed.
    assert wait_for_metric(url, "tova_state_slots_used", 0) == 0
    assert wait_for_metric(url, "tova_requests_total", before + 1,
                           finished_reason="abort") == before + 1
    assert scrape(url).value("tova_requests_running") == 0


def test_dropped_non_streaming_request_frees_its_slot(smol_server):
    url = smol_server.url
    body = {"model": SMOL_NAMES[0], "prompt": "Tell me a long story", "max_tokens": 4000,
            "ignore_eos": True, "n": 2}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, headers=auth_headers(), timeout=1.5)
    assert wait_for_metric(url, "tova_state_slots_used", 0) == 0
    # 4000 tokens would take minutes on a CPU; the abort came right after the hang-up.
    assert time.monotonic() - started < 15
    status = scrape(url).value("tova_http_requests_total", route="/v1/completions",
                               status="499")
    assert status >= 1


def test_dropped_chat_stream_while_queued(smol_server):
    """A request still waiting for a slot writes nothing; its hang-up must still abort it."""
    url = smol_server.url

    async def run() -> None:
        long = {"model": SMOL_NAMES[0], "prompt": "Go on", "max_tokens": 4000,
                "ignore_eos": True, "n": 8, "stream": True}
        chat = {"model": SMOL_NAMES[0], "messages": [{"role": "user", "content": "x"}],
                "stream": True}
        async with httpx.AsyncClient(base_url=url, headers=auth_headers(), timeout=60) as c:
            holder = await c.send(c.build_request("POST", "/v1/completions", json=long),
                                  stream=True)
            # Keep the line iterators referenced: a collected one closes its connection.
            holder_lines = holder.aiter_lines()
            await holder_lines.__anext__()  # all 8 slots are taken
            queued = await c.send(c.build_request("POST", "/v1/chat/completions", json=chat),
                                  stream=True)
            # The role chunk goes out at once, before the request has a slot.
            queued_lines = queued.aiter_lines()
            assert (await queued_lines.__anext__()).startswith("data: ")
            waiting = await asyncio.to_thread(wait_for_metric, url, "tova_requests_waiting", 1)
            assert waiting == 1
            await queued.aclose()
            await holder.aclose()

    asyncio.run(run())
    assert wait_for_metric(url, "tova_requests_waiting", 0) == 0
    assert wait_for_metric(url, "tova_state_slots_used", 0) == 0
