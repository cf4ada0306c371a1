"""The soak workload: a seeded mix of streamed and non-streamed completions and chats of
random lengths, sent at a fixed concurrency, each response checked for its token counts."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import httpx

from tests.reliability_utils import read_stream, with_token_logprobs

WORDS = ("state", "token", "river", "seven", "quiet", "lamp", "orbit", "paper", "green",
         "north", "glass", "every", "window", "number", "slow", "bright")
MAX_OUTPUT_TOKENS = 48


@dataclass(frozen=True, slots=True)
class SoakRequest:
    path: str
    body: dict
    stream: bool
    n: int
    max_tokens: int
    prompt_tokens: int | None  # known for token-id prompts


def _text(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def make_request(rng: random.Random) -> SoakRequest:
    stream = rng.random() < 0.5
    n = 2 if rng.random() < 0.1 else 1
    max_tokens = rng.randint(1, MAX_OUTPUT_TOKENS)
    body: dict = {"max_tokens": max_tokens, "n": n, "ignore_eos": True, "stream": stream,
                  "temperature": rng.choice((0.0, 0.7, 1.0))}
    if stream:
        body["stream_options"] = {"include_usage": True}
    prompt_tokens = None
    if rng.random() < 0.5:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": rng.choice(("user", "system")), "content": _text(rng, 40)}
                            for _ in range(rng.randint(1, 3))]
    else:
        path = "/v1/completions"
        if rng.random() < 0.5:
            prompt_tokens = rng.randint(1, 160)
            body["prompt"] = [rng.randint(5, 250) for _ in range(prompt_tokens)]
        else:
            body["prompt"] = _text(rng, 60)
    if stream:  # log-probs say how many tokens a chunk carries (a lagging stream merges)
        body.update(with_token_logprobs(path, {}))
    return SoakRequest(path, body, stream, n, max_tokens, prompt_tokens)


def make_requests(count: int, seed: int) -> list[SoakRequest]:
    rng = random.Random(seed)
    return [make_request(rng) for _ in range(count)]


async def _check(client: httpx.AsyncClient, request: SoakRequest) -> tuple[str | None, int]:
    """A failure's description (None if the response is right) and the tokens received."""
    wanted = [request.max_tokens] * request.n
    if request.stream:
        result = await read_stream(client, request.path, request.body)
        tokens = [result.tokens.get(i, 0) for i in range(request.n)]
        usage = result.usage or {}
        ok = (result.status == 200 and result.done and result.error is None
              and tokens == wanted and set(result.finish.values()) == {"length"}
              and len(result.finish) == request.n)
        got = f"status {result.status}, tokens {tokens}, error {result.error}"
    else:
        response = await client.post(request.path, json=request.body)
        if response.status_code != 200:
            return f"{request.path}: status {response.status_code}: {response.text}", 0
        out = response.json()
        usage = out["usage"]
        reasons = {choice["finish_reason"] for choice in out["choices"]}
        ok = len(out["choices"]) == request.n and reasons == {"length"}
        got = f"choices {len(out['choices'])}, finish {reasons}"
    ok = ok and usage.get("completion_tokens") == sum(wanted)
    if request.prompt_tokens is not None:
        ok = ok and usage.get("prompt_tokens") == request.prompt_tokens
    if ok:
        return None, sum(wanted)
    return f"{request.path} stream={request.stream}: wanted {wanted}, got {got}, {usage}", 0


@dataclass(frozen=True, slots=True)
class SoakReport:
    requests: int
    failures: list[str]
    duration_s: float
    output_tokens: int
    latencies_s: list[float]

    def summary(self) -> str:
        latencies = sorted(self.latencies_s)
        p99 = latencies[max(0, round(len(latencies) * 0.99) - 1)]
        return (f"{self.requests} requests in {self.duration_s:.1f} s "
                f"({self.requests / self.duration_s:.1f} req/s, "
                f"{self.output_tokens / self.duration_s:.0f} output tok/s), latency median "
                f"{statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                f"{len(self.failures)} failed")


async def run_soak(url: str, requests: list[SoakRequest], concurrency: int,
                   headers: dict[str, str]) -> SoakReport:
    """`concurrency` clients, each sending its next request as soon as the last one ended."""
    pending = iter(requests)
    failures: list[str] = []
    latencies: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for request in pending:
            started = time.perf_counter()
            try:
                failure, received = await _check(client, request)
            except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                failure, received = f"{request.path}: {type(exc).__name__}: {exc}", 0
            latencies.append(time.perf_counter() - started)
            tokens += received
            if failure is not None:
                failures.append(failure)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return SoakReport(len(requests), failures, time.perf_counter() - started, tokens, latencies)
