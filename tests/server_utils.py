"""Live `tova-serve` processes for the server tests, and helpers to read their /metrics.
The fixtures that start them live in `tests/server_fixtures.py`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
SMOL_NAMES = ("smol", "smol-alias")
START_TIMEOUT_S = 240.0


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str,
               poll_s: float = 0.1) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    """One request to an ASGI app in-process (no socket)."""

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


def wait_until_ok(process: subprocess.Popen, url: str, timeout_s: float, poll_s: float,
                  describe: Callable[[str], str]) -> None:
    """Poll `url` until it answers 200; raise RuntimeError(describe(why)) if the process
    exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(describe(f"exited with {process.returncode}"))
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(describe(f"not ready after {timeout_s} s"))


class ServerProcess:
    """`python -m server ...` on a free loopback port; `url` once /health answers 200."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port), *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self) -> ServerProcess:
        wait_until_ok(self.process, f"{self.url}/health", START_TIMEOUT_S, 0.25,
                      lambda why: f"server {why}:\n{self.log()}")
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def tiny_config(folder: Path, vocab_size: int = 128) -> Path:
    """A two-layer Llama config: random weights (dummy), no tokenizer, loads in a second."""
    path = folder / "tiny-llama.json"
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
    }))
    return path


# ----- /metrics ---------------------------------------------------------------------------


class Metrics:
    """One scrape: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self._samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in self.families.values() for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample whose labels include `labels` (summed if several match)."""
        wanted = set(labels.items())
        found = [v for (n, lbl), v in self._samples.items() if n == name and wanted <= lbl]
        if not found:
            raise KeyError(f"no sample {name} {labels}")
        return sum(found)

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        try:
            return self.value(name, **labels)
        except KeyError:
            return default


def scrape(url: str) -> Metrics:
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    return Metrics(response.text)


def wait_for_metric(url: str, name: str, expected: float, timeout_s: float = 10.0,
                    **labels: str) -> float:
    """Poll /metrics until `name` equals `expected`; returns the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = scrape(url).value(name, **labels)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
