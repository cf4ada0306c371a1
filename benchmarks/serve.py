"""Serving benchmark against a running tova-server (or one it launches), in the manner of
vLLM's `vllm bench serve`.

N streaming requests at a request rate (Poisson arrivals) or a fixed concurrency; prompts of
exactly --input-len tokens (random words, or windows of a text file), --output-len tokens
out with ignore_eos. With --shared-prefix-len L, each prompt starts with one of
--num-prefixes prefixes of L tokens (a system prompt, tool definitions: vLLM's
prefix-repetition workload), then its own --input-len tokens. With --turns T each of the
--num-prompts is a conversation of T requests, one after another, as a chat client that
re-sends its history: turn k's prompt is turn k-1's, then --output-len tokens standing for
the answer, then --input-len new ones (the prefix cache's case; TTFT is reported per
turn). Prints throughput, TTFT,
TPOT, ITL and end-to-end latency (mean, median, p99) and what the HTTP layer adds per token,
and saves it all as JSON.

Prompts are sent as token ids, built with the server's own /tokenize, so lengths are exact
and this script needs no tokenizer (nor torch).

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-prompts 256 \\
        --max-concurrency 64 --input-len 128 --output-len 64 --result-file out.json
    python benchmarks/serve.py --launch "--max-num-seqs 64 --state-size 256" ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shlex
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens (the prefix cache)
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    turn: int = 1


# ----- prompts ----------------------------------------------------------------------------


def random_text(num_words: int, rng: random.Random) -> str:
    return " ".join(
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        for _ in range(num_words)
    )


def token_stream(client: httpx.Client, args: argparse.Namespace, rng: random.Random) -> list[int]:
    """Token ids to cut prompts from: the text file, or random words."""
    needed = (max(args.input_len, args.output_len)
              + args.shared_prefix_len * args.num_prefixes) * 4
    if args.dataset_path:
        text = Path(args.dataset_path).read_text(encoding="utf-8", errors="replace")
    else:
        text = random_text(needed, rng)
    response = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    if response.status_code == 400 and not args.dataset_path:
        # A model without a tokenizer (dummy weights from a config): random ids do the same
        # work; every vocabulary has the first thousand.
        return [rng.randrange(1, 1000) for _ in range(needed)]
    response.raise_for_status()
    tokens = response.json()["tokens"]
    longest = max(args.input_len, args.shared_prefix_len,
                  args.output_len if args.turns > 1 else 0)
    if len(tokens) <= longest:
        sys.exit(f"the prompt source has {len(tokens)} tokens; --input-len, "
                 "--shared-prefix-len (and with --turns, --output-len) need more")
    return tokens


def make_prompts(tokens: list[int], args: argparse.Namespace,
                 rng: random.Random) -> list[list[int]]:
    """Own windows of --input-len tokens, each after its shared prefix (request i takes
    prefix i mod --num-prefixes) when --shared-prefix-len is set."""
    return [pieces[0] for pieces in make_conversations(tokens, args, rng)]


def make_conversations(tokens: list[int], args: argparse.Namespace,
                       rng: random.Random) -> list[list[list[int]]]:
    """Per conversation, what each turn adds to the prompt before it: turn 1 its prefix and
    own --input-len tokens, every later turn --output-len tokens (the answer it re-sends)
    and --input-len new ones. Turn k's prompt is the first k pieces joined."""
    def window(length: int) -> list[int]:
        start = rng.randrange(len(tokens) - length)
        return tokens[start : start + length]

    prefixes = [window(args.shared_prefix_len) for _ in range(args.num_prefixes)]
    turns = getattr(args, "turns", 1)
    return [[prefixes[i % args.num_prefixes] + window(args.input_len)]
            + [window(args.output_len) + window(args.input_len) for _ in range(turns - 1)]
            for i in range(args.num_prompts)]


def turn_prompts(pieces: list[list[int]]) -> Iterator[list[int]]:
    prompt: list[int] = []
    for piece in pieces:
        prompt = prompt + piece
        yield prompt


# ----- requests ---------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int],
                      args: argparse.Namespace) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos,
            "temperature": args.temperature}
    result = RequestResult(ok=False, prompt_tokens=len(prompt))
    started = time.perf_counter()
    last = started
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"]["message"]
                    return result
                if event["choices"]:
                    if result.ttft_s == 0.0:
                        result.ttft_s = now - started
                    else:
                        result.itl_s.append(now - last)
                    last = now
                elif event.get("usage"):
                    usage = event["usage"]
                    result.output_tokens = usage["completion_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens") or 0
    except httpx.HTTPError as exc:
        result.error = repr(exc)
        return result
    result.latency_s = time.perf_counter() - started
    result.ok = True
    return result


def arrival_gaps(args: argparse.Namespace, rng: random.Random) -> Iterator[float]:
    """Seconds before each request: 0 at an infinite rate, else gamma-distributed gaps with
    mean 1/rate (burstiness 1 = Poisson arrivals, as in vLLM)."""
    for _ in range(args.num_prompts):
        if args.request_rate == float("inf"):
            yield 0.0
        else:
            theta = 1.0 / (args.request_rate * args.burstiness)
            yield rng.gammavariate(args.burstiness, theta)


async def run_requests(base_url: str, headers: dict[str, str], model: str,
                       conversations: list[list[list[int]]], args: argparse.Namespace,
                       rng: random.Random) -> tuple[list[RequestResult], float]:
    """Each conversation's turns one after another (a single request without --turns),
    the conversations concurrently within --max-concurrency."""
    limit = args.max_concurrency or len(conversations)
    semaphore = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)

    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None)) as client:

        async def limited(pieces: list[list[int]]) -> list[RequestResult]:
            results = []
            async with semaphore:
                for turn, prompt in enumerate(turn_prompts(pieces), start=1):
                    result = await one_request(client, model, prompt, args)
                    result.turn = turn
                    results.append(result)
                    if not result.ok:
                        break  # the conversation cannot go on
            return results

        started = time.perf_counter()
        tasks = []
        for pieces, gap in zip(conversations, arrival_gaps(args, rng), strict=True):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(pieces)))
        results = [r for part in await asyncio.gather(*tasks) for r in part]
        return results, time.perf_counter() - started


def _client_process(base_url: str, headers: dict[str, str], model: str,
                    prompts: list[list[list[int]]], args: argparse.Namespace, seed: int,
                    start_at: float) -> tuple[list[RequestResult], float, float, float]:
    """One client process's share: (results, wall-clock start and end, its CPU seconds)."""
    args = argparse.Namespace(**{**vars(args), "num_prompts": len(prompts)})
    time.sleep(max(0.0, start_at - time.time()))
    cpu = time.process_time()
    started = time.time()
    results, _ = asyncio.run(
        run_requests(base_url, headers, model, prompts, args, random.Random(seed)))
    return results, started, time.time(), time.process_time() - cpu


def run_split(base_url: str, headers: dict[str, str], model: str,
              prompts: list[list[list[int]]],
              args: argparse.Namespace) -> tuple[list[RequestResult], float, float]:
    """The requests spread over --client-processes processes (one Python process parsing
    thousands of SSE events a second can be what limits the measurement): each gets every
    N-th prompt, its share of the concurrency and of the request rate. Returns (results,
    duration from the first start to the last end, client CPU seconds of all of them)."""
    count = args.client_processes
    share = argparse.Namespace(**{
        **vars(args),
        "max_concurrency": None if args.max_concurrency is None
        else -(-args.max_concurrency // count),
        "request_rate": args.request_rate / count,
    })
    start_at = time.time() + 3.0  # every process imported and waiting
    context = multiprocessing.get_context("spawn")
    with context.Pool(count) as pool:
        parts = pool.starmap(_client_process, [
            (base_url, headers, model, prompts[i::count], share, args.seed + i, start_at)
            for i in range(count)])
    results = [r for part in parts for r in part[0]]
    duration = max(p[2] for p in parts) - min(p[1] for p in parts)
    return results, duration, sum(p[3] for p in parts)


# ----- server metrics ---------------------------------------------------------------------


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def _total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and wanted <= set(lbl))


def mean_delta(before: dict, after: dict, name: str, **labels: str) -> float | None:
    """Mean of a histogram over the run: delta sum / delta count."""
    count = _total(after, f"{name}_count", **labels) - _total(before, f"{name}_count", **labels)
    total = _total(after, f"{name}_sum", **labels) - _total(before, f"{name}_sum", **labels)
    return total / count if count else None


def quantile_delta(before: dict, after: dict, name: str, q: float,
                   **labels: str) -> float | None:
    """A histogram's q-quantile over the run from its buckets' deltas: the upper bound of the
    bucket it falls in (as coarse as the buckets, and an upper bound)."""
    bounds = sorted({dict(lbl)["le"] for (n, lbl) in after if n == f"{name}_bucket"},
                    key=float)
    counts = [_total(after, f"{name}_bucket", le=le, **labels)
              - _total(before, f"{name}_bucket", le=le, **labels) for le in bounds]
    if not counts or counts[-1] <= 0:
        return None
    for le, count in zip(bounds, counts, strict=True):
        if count >= q * counts[-1]:
            return float(le)
    return None


def server_view(before: dict, after: dict) -> dict[str, float | None]:
    return {
        "decode_step_p99_s": quantile_delta(before, after, "tova_step_duration_seconds", 0.99,
                                            phase="decode"),
        "prefill_step_p99_s": quantile_delta(before, after, "tova_step_duration_seconds",
                                             0.99, phase="prefill"),
        "prefill_step_max_s": quantile_delta(before, after, "tova_step_duration_seconds", 1.0,
                                             phase="prefill"),
        "server_itl_p99_s": quantile_delta(before, after, "tova_inter_token_latency_seconds",
                                           0.99),
        "decode_step_s": mean_delta(before, after, "tova_step_duration_seconds",
                                    phase="decode"),
        "prefill_step_s": mean_delta(before, after, "tova_step_duration_seconds",
                                     phase="prefill"),
        "server_itl_s": mean_delta(before, after, "tova_inter_token_latency_seconds"),
        "batch_size": mean_delta(before, after, "tova_batch_size"),
        **{f"{phase}_steps": _total(after, "tova_step_duration_seconds_count", phase=phase)
           - _total(before, "tova_step_duration_seconds_count", phase=phase)
           for phase in ("decode", "prefill")},
        **{f"{phase}_seconds": _total(after, "tova_step_duration_seconds_sum", phase=phase)
           - _total(before, "tova_step_duration_seconds_sum", phase=phase)
           for phase in ("decode", "prefill")},
        # CPU seconds of the server's front-end process (HTTP, detokenizing, streaming).
        "frontend_cpu_s": _total(after, "process_cpu_seconds_total")
        - _total(before, "process_cpu_seconds_total"),
    }


# ----- report -----------------------------------------------------------------------------


def stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    array = np.asarray(values) * 1000
    return {"mean": float(array.mean()), "median": float(np.median(array)),
            "p99": float(np.percentile(array, 99))}


def summarize(results: list[RequestResult], duration: float, server: dict,
              args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = stats_ms([gap for r in ok for gap in r.itl_s])
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "total_input_tokens": prompt, "total_output_tokens": output,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration, "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        "ttft_ms": stats_ms([r.ttft_s for r in ok]), "tpot_ms": stats_ms(tpot), "itl_ms": itl,
        "e2el_ms": stats_ms([r.latency_s for r in ok]),
        "server": server,
    }
    summary["http_overhead"] = overhead(itl["mean"] / 1000, server)
    if getattr(args, "turns", 1) > 1:
        summary["turns"] = per_turn(ok, args.turns)
    return summary


def per_turn(ok: list[RequestResult], turns: int) -> dict:
    """TTFT, prompt tokens and tokens from the prefix cache by turn, and the median TTFT of
    the last turn over the second's (the first has nothing of its own to reuse)."""
    rows = []
    for turn in range(1, turns + 1):
        these = [r for r in ok if r.turn == turn]
        rows.append({
            "turn": turn, "requests": len(these), "ttft_ms": stats_ms([r.ttft_s for r in these]),
            "prompt_tokens": float(np.mean([r.prompt_tokens for r in these])) if these else 0.0,
            "cached_tokens": float(np.mean([r.cached_tokens for r in these])) if these else 0.0,
        })
    second, last = rows[1]["ttft_ms"]["median"], rows[-1]["ttft_ms"]["median"]
    return {"by_turn": rows, "last_over_second_ttft": last / second if second else None}


def overhead(client_itl_s: float, server: dict) -> dict[str, float | None]:
    """What serving adds per token on top of the engine's step time.

    The gate: (client ITL - decode step) / decode step. It over-states the overhead a little:
    prefill steps that run between decodes lengthen client ITL too. The server's own ITL
    (measured on the event loop as the engine hands each token over) isolates HTTP proper:
    serialisation, SSE framing, the socket and the client's parsing."""
    decode, server_itl = server["decode_step_s"], server["server_itl_s"]
    if not decode or server_itl is None:
        return {}
    return {
        "added_vs_decode_step_ms": (client_itl_s - decode) * 1000,
        "added_vs_decode_step_ratio": (client_itl_s - decode) / decode,
        "http_only_ms": (client_itl_s - server_itl) * 1000,
        "http_only_ratio": (client_itl_s - server_itl) / decode,
    }


def _pair(first: float | None, second: float | None) -> str:
    return " / ".join("n/a" if v is None else f"{v * 1000:.0f}" for v in (first, second))


SECTION = object()  # a row that starts a section: (SECTION, title)


def print_table(s: dict) -> None:
    rows: list[tuple] = [
        ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", s["duration_s"]),
        ("Total input tokens", s["total_input_tokens"]),
        ("Input tokens from the prefix cache", s["total_cached_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", s["request_throughput"]),
        ("Output token throughput (tok/s)", s["output_throughput"]),
        ("Total token throughput (tok/s)", s["total_token_throughput"]),
    ]
    for title, key, short in (("Time to First Token", "ttft_ms", "TTFT"),
                              ("Time per Output Token (excl. 1st token)", "tpot_ms", "TPOT"),
                              ("Inter-token Latency", "itl_ms", "ITL"),
                              ("End-to-end Latency", "e2el_ms", "E2EL")):
        rows.append((SECTION, title))
        rows += [(f"{name} {short} (ms)", s[key][stat])
                 for name, stat in (("Mean", "mean"), ("Median", "median"), ("P99", "p99"))]
    server, extra = s["server"], s["http_overhead"]
    rows.append((SECTION, "Engine steps (/metrics) and serving overhead"))
    for label, value, scale in (
        ("Mean decode step (ms)", server["decode_step_s"], 1000),
        ("Mean prefill step (ms)", server["prefill_step_s"], 1000),
        ("Mean batch size", server["batch_size"], 1),
        ("Decode steps", server["decode_steps"], 1),
        ("Prefill steps (ran prompt tokens)", server["prefill_steps"], 1),
        ("Time in prefill steps (s)", server["prefill_seconds"], 1),
        ("P99 decode / prefill step, bucket bound (ms)", _pair(
            server.get("decode_step_p99_s"), server.get("prefill_step_p99_s")), 1),
        ("Longest prefill step, bucket bound (ms)", server.get("prefill_step_max_s"), 1000),
        ("Mean server-side ITL (ms)", server["server_itl_s"], 1000),
        ("P99 server-side ITL, bucket bound (ms)", server.get("server_itl_p99_s"), 1000),
        ("Mean ITL - mean decode step (ms)", extra.get("added_vs_decode_step_ms"), 1),
        ("  as share of decode step (%)", extra.get("added_vs_decode_step_ratio"), 100),
        ("HTTP only: ITL - server-side ITL (ms)", extra.get("http_only_ms"), 1),
        ("  as share of decode step (%)", extra.get("http_only_ratio"), 100),
        # Near 100 %: that process is the bottleneck (one Python thread at a time).
        ("Server front end CPU busy (%)", server["frontend_cpu_s"] / s["duration_s"], 100),
        ("Benchmark client CPU busy (%, per process)",
         s["client_cpu_s"] / s["duration_s"] / s["config"]["client_processes"], 100),
    ):
        rows.append((label, value if value is None or isinstance(value, str)
                     else value * scale))
    if "turns" in s:
        by_turn = s["turns"]["by_turn"]
        rows.append((SECTION, "Conversations (each turn re-sends the last)"))
        for row in (by_turn[0], by_turn[1], by_turn[-1]):
            rows.append((f"Median TTFT, turn {row['turn']} (ms)", row["ttft_ms"]["median"]))
            rows.append((f"  prompt / cached tokens, turn {row['turn']}",
                         f"{row['prompt_tokens']:.0f} / {row['cached_tokens']:.0f}"))
        rows.append((f"TTFT turn {by_turn[-1]['turn']} / turn 2",
                     s["turns"]["last_over_second_ttft"]))
    print(f"{' Serving Benchmark Result ':=^60}")
    for label, value in rows:
        if label is SECTION:
            print(f"{' ' + value + ' ':-^60}")
        elif isinstance(value, float):
            print(f"{label:<44}{value:>16.2f}")
        else:
            print(f"{label:<44}{'n/a' if value is None else value:>16}")
    print("=" * 60)


# ----- main -------------------------------------------------------------------------------


@contextlib.contextmanager
def launched(args: argparse.Namespace) -> Iterator[None]:
    """Optionally start `python -m server` with --launch's flags and stop it afterwards."""
    if args.launch is None:
        yield
        return
    port = args.base_url.rsplit(":", 1)[-1].split("/")[0]
    command = [sys.executable, "-m", "server", "--port", port, "--disable-access-log",
               *shlex.split(args.launch)]
    process = subprocess.Popen(command, cwd=REPO)
    try:
        wait_healthy(args.base_url, process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_healthy(base_url: str, process: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the launched server exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    sys.exit("the launched server did not become healthy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=os.environ.get("TOVA_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson); inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of arrival gaps; 1 = Poisson, lower = burstier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens every prompt starts with before its own --input-len")
    p.add_argument("--num-prefixes", type=int, default=1,
                   help="distinct shared prefixes, taken in turn")
    p.add_argument("--turns", type=int, default=1,
                   help="requests per conversation, each re-sending the one before it "
                        "(a multi-turn chat)")
    p.add_argument("--dataset-path", default=None,
                   help="text file to cut prompts from (default: random words)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-warmups", type=int, default=0,
                   help="requests run (at --max-concurrency) and discarded before measuring")
    p.add_argument("--result-file", default=None, help="write the results as JSON here")
    p.add_argument("--client-processes", type=int, default=1,
                   help="spread the requests over this many client processes")
    p.add_argument("--launch", default=None, metavar="SERVER_FLAGS",
                   help="start `python -m server SERVER_FLAGS` on --base-url's port first")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--num-prompts, --input-len and --output-len must be >= 1")
    if args.num_warmups < 0:
        p.error("--num-warmups must be >= 0")
    if args.shared_prefix_len < 0 or args.num_prefixes < 1:
        p.error("--shared-prefix-len must be >= 0 and --num-prefixes >= 1")
    if args.client_processes < 1:
        p.error("--client-processes must be >= 1")
    if args.turns < 1:
        p.error("--turns must be >= 1")
    if args.request_rate <= 0 or args.burstiness <= 0:
        p.error("--request-rate and --burstiness must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    with launched(args), httpx.Client(base_url=args.base_url, headers=headers,
                                      timeout=120) as client:
        model = args.model or client.get("/v1/models").json()["data"][0]["id"]
        tokens = token_stream(client, args, rng)
        prompts = make_conversations(tokens, args, rng)
        if args.num_warmups:
            # First steps at each batch shape are slow (allocator growth, kernel selection).
            warmup = argparse.Namespace(**{**vars(args), "num_prompts": args.num_warmups,
                                           "request_rate": float("inf"), "turns": 1})
            asyncio.run(run_requests(args.base_url, headers, model,
                                     make_conversations(tokens, warmup, rng), warmup, rng))
        before = scrape(client)
        if args.client_processes > 1:
            results, duration, client_cpu_s = run_split(
                args.base_url, headers, model, prompts, args)
        else:
            cpu_before = time.process_time()
            results, duration = asyncio.run(
                run_requests(args.base_url, headers, model, prompts, args, rng))
            client_cpu_s = time.process_time() - cpu_before
        summary = summarize(results, duration, server_view(before, scrape(client)), args)
        summary["client_cpu_s"] = client_cpu_s
    print_table(summary)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
