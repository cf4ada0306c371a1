"""Load balancers in front of tova-server replicas, on the same traffic, side by side.

Starts --replicas servers (the flags in --server-flags), then for each balancer (HAProxy with
docker/haproxy/haproxy.cfg, nginx with the equivalent settings below, and no balancer: one
replica directly, for the hop's cost) runs `benchmarks/serve.py` through it, and a drain
test: long streams running, SIGTERM to one replica, a burst of new requests; it counts the
requests that failed. Prints a table and saves JSON.

    python benchmarks/balancers.py --replicas 2 --num-prompts 256 --max-concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import serve  # noqa: E402

NGINX = """
worker_processes 1;
pid {pid};
error_log {log} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    upstream replicas {{
        least_conn;
        {servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Server-sent events go out as they come.
            proxy_buffering off;
            proxy_read_timeout 15m;
            # nginx's free edition has no active health checks: a draining replica's 503
            # (or a refused connection) is retried on the next server, POSTs included.
            proxy_next_upstream error timeout http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            # No counterpart of HAProxy's stick table on response ids (reading the JSON body
            # needs njs): a continuation goes to any replica, which reads its state from the
            # shared --state-store-dir.
        }}
    }}
}}
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--server-flags", default="--max-num-seqs 32 --state-size 64 --device cpu",
                   help="flags for every replica (default: the embedded model on CPU)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--drain-streams", type=int, default=32)
    p.add_argument("--drain-burst", type=int, default=32)
    p.add_argument("--out", default=None)
    return p.parse_args()


def start_replicas(args, workdir: Path) -> list[tuple[subprocess.Popen, int]]:
    replicas = []
    for i in range(args.replicas):
        port = 8300 + i
        command = [sys.executable, "-m", "server", "--port", str(port), "--disable-access-log",
                   "--shutdown-timeout", "120", *shlex.split(args.server_flags)]
        log = open(workdir / f"replica-{i}.log", "w")  # noqa: SIM115  (lives with the process)
        replicas.append((subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log), port))
    for process, port in replicas:
        serve.wait_healthy(f"http://127.0.0.1:{port}", process)
    return replicas


def loopback_haproxy_config(port: int, backends: list[int], log: str | None = None) -> str:
    """docker/haproxy/haproxy.cfg for servers on this machine: its compose `server-template`
    (Docker DNS) replaced by loopback servers, listening on `port`; logs to stderr if `log`
    is "stderr", else nowhere."""
    lines = []
    for line in (REPO / "docker/haproxy/haproxy.cfg").read_text().splitlines():
        s = line.strip()
        if s.startswith("server-template"):
            lines += [f"    server r{i} 127.0.0.1:{b} check" for i, b in enumerate(backends)]
        elif s.startswith("bind :8080"):
            lines.append(f"    bind 127.0.0.1:{port}")
        elif s.startswith("log stdout"):
            if log == "stderr":
                lines.append("    log stderr format raw local0")
        elif not s.startswith(("resolvers docker", "nameserver dns", "hold valid")):
            lines.append(line)
    return "\n".join(lines) + "\n"


def haproxy(port: int, backends: list[int], workdir: Path) -> subprocess.Popen:
    config = workdir / "haproxy.cfg"
    config.write_text(loopback_haproxy_config(port, backends))
    return subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def nginx(port: int, backends: list[int], workdir: Path) -> subprocess.Popen:
    servers = "\n        ".join(f"server 127.0.0.1:{b} max_fails=1 fail_timeout=5s;"
                                for b in backends)
    config = workdir / "nginx.conf"
    config.write_text(NGINX.format(pid=workdir / "nginx.pid", log=workdir / "nginx.log",
                                   tmp=workdir, servers=servers, port=port))
    return subprocess.Popen(["nginx", "-c", str(config), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_up(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                time.sleep(2.5)  # HAProxy: two passed checks ("rise 2")
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} did not come up")


def load(url: str, args) -> dict:
    return serve.main([
        "--base-url", url, "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.max_concurrency), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--num-warmups", "8",
    ])


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> bool:
    body = {"prompt": [5, 6, 7, 8], "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "temperature": 0}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return False
            async for line in response.aiter_lines():
                if '"error"' in line:
                    return False
        return True
    except httpx.HTTPError:
        return False


def drain(url: str, victim: subprocess.Popen, args) -> dict:
    """Streams running, SIGTERM to one replica, a burst: how many of each failed."""

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=256)) as client:
            running = [asyncio.create_task(_stream(client, 4 * args.output_len))
                       for _ in range(args.drain_streams)]
            await asyncio.sleep(2.0)
            victim.send_signal(signal.SIGTERM)
            burst = [asyncio.create_task(_stream(client, args.output_len))
                     for _ in range(args.drain_burst)]
            return await asyncio.gather(*running), await asyncio.gather(*burst)

    running, burst = asyncio.run(run())
    return {"running_failed": running.count(False), "burst_failed": burst.count(False)}


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="balancers-"))
    results = {}
    for name, start in (("direct (one replica)", None), ("haproxy", haproxy), ("nginx", nginx)):
        replicas = start_replicas(args, workdir)
        ports = [port for _, port in replicas]
        balancer = None
        url = f"http://127.0.0.1:{ports[0]}"
        if start is not None:
            url = "http://127.0.0.1:8390"
            balancer = start(8390, ports, workdir)
            wait_up(url)
        try:
            summary = load(url, args)
            row = {k: summary[k] for k in ("output_throughput", "request_throughput",
                                           "failed")}
            row.update(ttft_p99_ms=summary["ttft_ms"]["p99"], itl_p99_ms=summary["itl_ms"]["p99"],
                       ttft_mean_ms=summary["ttft_ms"]["mean"])
            if balancer is not None:
                row.update(drain(url, replicas[0][0], args))
            results[name] = row
            print(name, json.dumps(row), flush=True)
        finally:
            if balancer is not None:
                balancer.terminate()
                balancer.wait(10)
            for process, _ in replicas:
                if process.poll() is None:
                    process.terminate()
                    process.wait(60)
    print("\n| balancer | output tok/s | req/s | mean TTFT ms | p99 TTFT ms | p99 ITL ms | "
          "failed | drain: streams failed | drain: burst failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['output_throughput']:.0f} | {r['request_throughput']:.2f} | "
              f"{r['ttft_mean_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p99_ms']:.0f} | "
              f"{r['failed']} | {r.get('running_failed', '-')} | {r.get('burst_failed', '-')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
