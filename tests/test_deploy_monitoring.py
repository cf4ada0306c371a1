"""The monitoring stack against a live server: the dashboard names only exported metrics,
`promtool check metrics` accepts /metrics, the image's health check command works, and a real
Prometheus, run with the repository's config retargeted at the server, answers every
dashboard query with data after a little load."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from tests.deploy_utils import (
    DOCKERFILE,
    PROMETHEUS_CONFIG,
    PrometheusProcess,
    concrete,
    dashboard,
    expressions,
    read_yaml,
    require_binary,
    retarget,
    selectors,
)
from tests.server_utils import (
    Metrics,
    ServerProcess,
    free_port,
    scrape,
    tiny_config,
    wait_until,
)

MODEL = "tova-deploy-test"
# Two slots for three clients: requests wait (queue time, waiting gauge). Prompts of 100+
# tokens in a 16-entry state: every request evicts, so the TOVA panels get data. They share
# their first 64 tokens, one prefix-cache block (--prefill-chunk-size 64): the prefix-cache
# panels get hits.
STATE_SIZE, SLOTS, CLIENTS = 16, 2, 3
LOAD_S = 8.0
SHARED_PREFIX = [3 + (i * 5) % 120 for i in range(64)]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("deploy-server")
    process = ServerProcess([
        "--model", str(tiny_config(folder)), "--load-format", "dummy", "--device", "cpu",
        "--state-size", str(STATE_SIZE), "--max-num-seqs", str(SLOTS),
        "--prefill-chunk-size", "64", "--prefix-cache-bytes", str(2**20),
        "--served-model-name", MODEL, "--disable-access-log",
    ], folder / "server.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def complete(client: httpx.Client, index: int) -> None:
    prompt = SHARED_PREFIX + [3 + (index * 7 + i) % 120 for i in range(40 + index % 16)]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24 + index % 8, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


def drive_load(url: str, seconds: float) -> int:
    """CLIENTS threads sending completions back to back for `seconds`; returns how many."""
    deadline = time.monotonic() + seconds
    count = 0
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        nonlocal count
        with httpx.Client(base_url=url, timeout=60) as client:
            index = worker
            while time.monotonic() < deadline:
                complete(client, index)
                index += CLIENTS
                with lock:
                    count += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client_loop, worker) for worker in range(CLIENTS)]:
            future.result()
    return count


@pytest.fixture(scope="module")
def metrics_text(server) -> str:
    """/metrics once a few requests have finished, so every family has samples."""
    drive_load(server.url, 0.5)
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def test_dashboard_names_only_metrics_the_server_exports(metrics_text):
    exported = {sample.name for family in Metrics(metrics_text).families.values()
                for sample in family.samples}
    for title, expr in expressions(dashboard()):
        for metric, _ in selectors(expr):
            assert metric in exported, f"{title}: {metric} is not in /metrics"


def test_promtool_check_metrics_finds_no_problem(metrics_text):
    binary = require_binary("promtool", "apt-get install prometheus")
    result = subprocess.run([binary, "check", "metrics"], input=metrics_text,
                            capture_output=True, text=True, timeout=60)
    problems = {line.strip() for line in (result.stdout + result.stderr).splitlines()
                if line.strip()}
    assert not problems, problems
    assert result.returncode == 0


def healthcheck_command(port: int) -> list[str]:
    """The Dockerfile's HEALTHCHECK, run by this interpreter against `port`."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    command = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M).group(1))
    assert command[0] == "python"
    return [sys.executable, *(arg.replace(":8000/", f":{port}/") for arg in command[1:])]


def test_image_health_check_passes_on_a_live_server_and_fails_without_one(server):
    assert subprocess.run(healthcheck_command(server.port), timeout=30).returncode == 0
    closed = subprocess.run(healthcheck_command(free_port()), capture_output=True, timeout=30)
    assert closed.returncode != 0


# ----- a real Prometheus ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[PrometheusProcess]:
    require_binary("prometheus", "apt-get install prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config, original = retarget(read_yaml(PROMETHEUS_CONFIG), f"127.0.0.1:{server.port}")
    assert original == ["server:8000"]
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    process = PrometheusProcess(config_path, workdir)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def scraped_value(prometheus: PrometheusProcess, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def loaded(server, prometheus) -> PrometheusProcess:
    """Prometheus holding a scrape before the load, several during, and one after it."""
    wait_until(lambda: scraped_value(prometheus, 'up{job="tova-server"}') == 1.0, 30,
               "the first scrape", poll_s=0.25)
    assert drive_load(server.url, LOAD_S) > 0
    final = scrape(server.url).value("tova_generation_tokens_total")
    wait_until(lambda: scraped_value(
        prometheus, f'tova_generation_tokens_total{{model_name="{MODEL}"}}') == final, 30,
        "a scrape after the load", poll_s=0.25)
    return prometheus


def test_scrape_target_is_up_without_errors(loaded, server):
    (target,) = loaded.active_targets()
    assert target["labels"]["job"] == "tova-server"
    assert target["scrapeUrl"] == f"{server.url}/metrics"
    assert (target["health"], target["lastError"]) == ("up", "")
    assert target["scrapeInterval"] == "5s"


def test_model_name_variable_finds_the_served_model(loaded):
    assert loaded.label_values("model_name", "tova_engine_info") == [MODEL]


def finite_values(result: list[dict]) -> list[float]:
    values = [float(series["value"][1]) for series in result]
    return [value for value in values if math.isfinite(value)]


def test_every_dashboard_query_returns_data_through_prometheus(loaded):
    empty = []
    for title, expr in expressions(dashboard()):
        query = concrete(expr, MODEL)
        assert "$" not in query, f"{title}: an unsubstituted variable in {query}"
        if not finite_values(loaded.query(query)):
            empty.append(f"{title}: {query}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_instance_picker_selects_one_replica(loaded, server):
    """Prometheus labels the scraped server `instance="127.0.0.1:PORT"`: picked, the panels
    show its data; another instance shows none."""
    exprs = [expr for title, expr in expressions(dashboard())
             if title == "Prompt and generation tokens/s"]
    own = f"127.0.0.1:{server.port}"  # a regex too; its dots match themselves
    assert all(finite_values(loaded.query(concrete(e, MODEL, own))) for e in exprs)
    assert not any(loaded.query(concrete(e, MODEL, "10.9.9.9:8000")) for e in exprs)


def test_tova_panels_show_the_load(loaded):
    """The eviction panels are not just present but non-zero under a small state."""
    rate = f'sum(rate(tova_evicted_tokens_total{{model_name="{MODEL}"}}[30s]))'
    assert finite_values(loaded.query(rate))[0] > 0
    info = loaded.query(f'tova_engine_info{{model_name="{MODEL}"}}')[0]["metric"]
    assert (info["policy"], info["state_size"], info["max_num_seqs"]) == (
        "tova", str(STATE_SIZE), str(SLOTS))
