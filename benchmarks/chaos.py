"""Chaos under load: streams through HAProxy over several replicas while the fleet is hurt.

Starts --replicas servers (each with --front-ends front-end processes and fault injection on)
behind the shipped HAProxy config (docker/haproxy/haproxy.cfg on loopback), keeps --streams
streamed completions running for --duration seconds and until every fault is dealt (each
asks for --max-tokens tokens with ignore_eos; a tenth of them hang up early, as clients do),
and meanwhile:

    at 20 %  the engine core of replica 0 dies (X-Tova-Fault: kill-engine)
    at 40 %  a front-end process of replica 1 is SIGKILLed (replica 0 may be healing still)
    at 60 %  replica 0 gets SIGTERM (it drains and exits; once its core is back), and is
             started again

Every request must end one of these ways: complete (every token, then [DONE]); an error
(an HTTP error status, or an error event in the stream); cut (the connection ended: the
process holding it died); dropped (the client hung up, on purpose). None may hang (no byte
for --hang-after seconds) or end short (a [DONE] with tokens missing). Afterwards every
replica must be ready with no request running and no slot held, and a last wave through the
balancer must complete whole. Prints a table, and the times each fault took to heal; saves
JSON.

    python benchmarks/chaos.py --streams 128 --duration 30          # CPU, a tiny model
    python benchmarks/chaos.py --streams 1024 --duration 120 \\
        --server-flags "--model /models/llama --load-format dummy --max-num-seqs 512 ..."
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.balancers import haproxy  # noqa: E402

OUTCOMES = ("complete", "error", "cut", "dropped", "short", "hung")
FAILURES = ("short", "hung")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--front-ends", type=int, default=2, help="--api-server-count per replica")
    p.add_argument("--server-flags", default=None,
                   help="flags for every replica (default: a tiny random model on CPU)")
    p.add_argument("--streams", type=int, default=128, help="concurrent streams")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hang-after", type=float, default=60.0,
                   help="seconds without a byte after which a stream counts as hung")
    p.add_argument("--heal-timeout", type=float, default=120.0,
                   help="seconds the fleet may take to be whole again")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="logs and the config (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON results file")
    return p.parse_args(argv)


# ----- the fleet ---------------------------------------------------------------------------

class Replica:
    def __init__(self, index: int, port: int, flags: list[str], workdir: Path) -> None:
        self.index, self.port, self.flags, self.workdir = index, port, flags, workdir
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"replica-{self.index}.{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "-m", "server", "--port", str(self.port),
                   "--disable-access-log", "--enable-fault-injection", *self.flags]
        log = open(self.log_path, "w")  # noqa: SIM115  (lives with the process)
        self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)

    def front_end_pids(self) -> list[int]:
        return [int(pid) for pid in
                re.findall(r"Started server process \[(\d+)\]", self.log_path.read_text())]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# The faults' and the probes' blocking calls run here, not in the event loop's default
# executor: that one also resolves the load's host names (every new connection), and a probe
# queued behind them would report the fleet slower to heal than it is.
_PROBES = ThreadPoolExecutor(4, thread_name_prefix="chaos-probe")


async def off_loop(function, *args):
    return await asyncio.get_running_loop().run_in_executor(_PROBES, function, *args)


async def wait_for(predicate, timeout_s: float, what: str) -> float:
    """Seconds until `predicate()` holds (polled off the event loop)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await off_loop(predicate):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")


def default_flags(workdir: Path) -> list[str]:
    """A tiny random Llama (no tokenizer: token-id prompts) on CPU."""
    from tests.server_utils import tiny_config

    return ["--model", str(tiny_config(workdir)), "--load-format", "dummy", "--device", "cpu",
            "--state-size", "16", "--max-num-seqs", "64", "--shutdown-timeout", "30"]


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (all label sets) in a Prometheus text page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


# ----- the load ----------------------------------------------------------------------------

@dataclass(slots=True)
class Outcome:
    kind: str
    tokens: int
    seconds: float
    detail: str = ""


async def one_stream(client: httpx.AsyncClient, rng: random.Random, max_tokens: int,
                     drop_after: int | None, hang_after: float) -> Outcome:
    body = {"prompt": [rng.randint(5, 120) for _ in range(rng.randint(4, 24))],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "logprobs": 0,
            "temperature": 0.8}
    started = time.monotonic()
    tokens = 0

    def ended(kind: str, detail: str = "") -> Outcome:
        return Outcome(kind, tokens, time.monotonic() - started, detail)

    try:
        async with client.stream("POST", "/v1/completions", json=body,
                                 timeout=httpx.Timeout(10, read=hang_after)) as response:
            if response.status_code != 200:
                await response.aread()
                return ended("error", f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return ended("complete" if tokens == max_tokens else "short")
                event = json.loads(data)
                if "error" in event:
                    return ended("error", event["error"].get("code") or "error event")
                for choice in event["choices"]:
                    tokens += len((choice.get("logprobs") or {}).get("tokens") or ())
                if drop_after is not None and tokens >= drop_after:
                    return ended("dropped")  # leaving the block closes the connection
            return ended("cut", "no [DONE]")
    except httpx.ReadTimeout:
        return ended("hung")
    except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
        return ended("cut", type(exc).__name__)


async def load(url: str, streams: int, until: float, faults_done: asyncio.Event, args,
               rng: random.Random, outcomes: list[Outcome]) -> None:
    """Streams back to back until `until`, and on until every fault has been dealt."""
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        async def worker(seed: int) -> None:
            local = random.Random(seed)
            while time.monotonic() < until or not faults_done.is_set():
                drop = local.randint(1, args.max_tokens - 1) if local.random() < 0.1 else None
                outcomes.append(await one_stream(client, local, args.max_tokens, drop,
                                                 args.hang_after))

        await asyncio.gather(*(worker(rng.randrange(2**31)) for _ in range(streams)))


# ----- the faults --------------------------------------------------------------------------

async def kill_core(replica: Replica, heal_s: float) -> float:
    """The engine core dies; seconds until the replica is ready again."""
    async with httpx.AsyncClient(base_url=replica.url, timeout=30) as client:
        with contextlib.suppress(httpx.TransportError):  # it fails, as it should
            await client.post("/v1/completions", headers={"X-Tova-Fault": "kill-engine"},
                              json={"prompt": [5, 6, 7], "max_tokens": 4})
    await wait_for(lambda: not replica.ready(), 10, "the core's death seen by /ready")
    return await wait_for(replica.ready, heal_s, f"replica {replica.index} ready again")


async def kill_front_end(replica: Replica, heal_s: float) -> float:
    """A front-end process dies (SIGKILL); seconds until its replacement has started."""
    before = replica.front_end_pids()
    victim = before[-1]
    os.kill(victim, signal.SIGKILL)
    return await wait_for(lambda: len(replica.front_end_pids()) > len(before), heal_s,
                          f"replica {replica.index}'s front end started again")


async def restart(replica: Replica, heal_s: float) -> tuple[float, float]:
    """SIGTERM (drain, exit), then the same replica started again: (seconds until it had
    exited, seconds from its start until it was ready)."""
    started = time.monotonic()
    await off_loop(replica.stop)
    exited = time.monotonic() - started
    replica.start()
    return exited, await wait_for(replica.ready, heal_s, f"replica {replica.index} restarted")


async def faults(replicas: list[Replica], start: float, duration: float,
                 heal_s: float) -> dict[str, float]:
    """Each fault at its time, whether the ones before have healed or not (the front end
    dies while the other replica's core may still be restarting); the SIGTERM waits for its
    replica's core to be back, so that each heal is measured on its own."""
    async def at(fraction: float, fault):
        await asyncio.sleep(max(0.0, start + fraction * duration - time.monotonic()))
        return await fault

    core = asyncio.create_task(at(0.2, kill_core(replicas[0], heal_s)))
    front_end = asyncio.create_task(at(0.4, kill_front_end(replicas[1 % len(replicas)],
                                                           heal_s)))
    healed = {"engine core killed: replica ready again (s)": await core}
    exited, ready = await at(0.6, restart(replicas[0], heal_s))
    healed["front end killed: replacement started (s)"] = await front_end
    healed["SIGTERM: drained and exited (s)"] = exited
    healed["  started again: ready (s)"] = ready
    return healed


# ----- the run -----------------------------------------------------------------------------

async def check_whole(replicas: list[Replica], balancer: str, args) -> dict[str, float]:
    """After the load: every replica ready and idle, and a last wave served whole."""
    for replica in replicas:
        await wait_for(replica.ready, args.heal_timeout, f"replica {replica.index} ready")
    started = time.monotonic()

    def idle() -> bool:
        pages = [httpx.get(f"{r.url}/metrics", timeout=5).text for r in replicas]
        return all(metric(page, name) == 0 for page in pages
                   for name in ("tova_requests_running", "tova_requests_waiting",
                                "tova_state_slots_used"))

    settled = await wait_for(idle, 30, "every replica idle (no request, no slot)")
    wave: list[Outcome] = []
    rng = random.Random(args.seed + 1)
    async with httpx.AsyncClient(base_url=balancer) as client:
        wave = await asyncio.gather(*(one_stream(client, rng, args.max_tokens, None,
                                                 args.hang_after)
                                      for _ in range(min(args.streams, 64))))
    return {"idle after the load (s)": settled,
            "last wave complete": sum(o.kind == "complete" for o in wave),
            "last wave size": len(wave), "checked in (s)": time.monotonic() - started}


async def run(args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tova-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    flags = shlex.split(args.server_flags) if args.server_flags else default_flags(workdir)
    flags += ["--api-server-count", str(args.front_ends)]
    from tests.server_utils import free_port

    replicas = [Replica(i, free_port(), flags, workdir) for i in range(args.replicas)]
    port = free_port()
    balancer = haproxy(port, [r.port for r in replicas], workdir)
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            await wait_for(replica.ready, 600, f"replica {replica.index} ready")
            await wait_for(lambda r=replica: len(r.front_end_pids()) >= args.front_ends, 60,
                           "every front end started")
        await asyncio.sleep(2.5)  # HAProxy's "rise 2" checks, a second apart
        url = f"http://127.0.0.1:{port}"
        outcomes: list[Outcome] = []
        start = time.monotonic()
        faults_done = asyncio.Event()
        load_task = asyncio.create_task(load(url, args.streams, start + args.duration,
                                             faults_done, args, random.Random(args.seed),
                                             outcomes))
        try:
            healed = await faults(replicas, start, args.duration, args.heal_timeout)
        finally:
            faults_done.set()
        await load_task
        after = await check_whole(replicas, url, args)
    finally:
        for replica in replicas:
            replica.stop()
        balancer.terminate()
        balancer.wait()
    counts = Counter(o.kind for o in outcomes)
    longest = {kind: max((o.seconds for o in outcomes if o.kind == kind), default=0.0)
               for kind in OUTCOMES}
    return {"args": {k: v for k, v in vars(args).items()}, "outcomes": dict(counts),
            "requests": len(outcomes), "longest_seconds": longest, "healed": healed,
            "after": after, "failures": sum(counts[kind] for kind in FAILURES),
            "details": dict(Counter(o.detail for o in outcomes if o.detail)),
            "workdir": str(workdir)}


@dataclass
class Table:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: object) -> None:
        self.rows.append((name, f"{value:.1f}" if isinstance(value, float) else str(value)))

    def __str__(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in self.rows)


def report(result: dict) -> str:
    table = Table()
    table.add("requests", result["requests"])
    for kind in OUTCOMES:
        table.add(f"  {kind}", result["outcomes"].get(kind, 0))
    table.add("failures (short or hung)", result["failures"])
    for name, seconds in result["healed"].items():
        table.add(name, seconds)
    for name, value in result["after"].items():
        table.add(name, value)
    return str(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=asdict))
    whole = result["after"]["last wave complete"] == result["after"]["last wave size"]
    return 0 if result["failures"] == 0 and whole else 1


if __name__ == "__main__":
    sys.exit(main())
