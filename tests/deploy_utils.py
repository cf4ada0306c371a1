"""Helpers for the deployment tests: the repository's deploy files, the dashboard's PromQL,
`docker-compose config`, and a throwaway Prometheus process on a loopback port."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.server_utils import REPO, free_port, wait_until_ok

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.override.yml"
ENV_EXAMPLE = REPO / ".env.example"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tova.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "tova.yml"
# What Grafana's $__rate_interval becomes in the tests: four 5 s scrapes plus a margin.
TEST_RATE_INTERVAL = "30s"


def require_binary(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed ({install}; .ci/run installs it)")
    return path


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ----- the dashboard --------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def data_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that queries (rows hold no queries), nested rows included."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def expressions(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    for panel in data_panels(board):
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


# A selector with label matchers; the dashboard writes every selector this way, so that a
# metric named without `{model_name="$model_name"}` is caught by `bare_identifiers`.
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "on", "ignoring", "group_left", "group_right", "bool", "offset"})


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of every `name{...}` in `expr`."""
    return SELECTOR.findall(expr)


def bare_identifiers(expr: str) -> list[str]:
    """Names left once selectors, ranges, grouping labels, function names and keywords are
    removed: metrics written without label matchers."""
    rest = SELECTOR.sub(" ", expr)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ",
                  rest)
    rest = re.sub(r"[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", rest)
    names = re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", rest)
    return [name for name in names if name not in PROMQL_KEYWORDS]


def concrete(expr: str, model_name: str, instance: str = ".*") -> str:
    """The query Grafana would send, with the test's model and rate window, and the
    Instance picker at All (`.*`, its allValue) unless one is given."""
    return (expr.replace("$__rate_interval", TEST_RATE_INTERVAL)
            .replace("$model_name", model_name).replace("$instance", instance))


# ----- docker-compose -------------------------------------------------------------------------


def compose_config(env_file: Path, *files: Path, env: dict[str, str] | None = None) -> dict:
    """The merged project as `docker-compose config` resolves it (variables substituted,
    relative paths made absolute). No files: compose's own default, with the override."""
    binary = require_binary("docker-compose", "apt-get install docker-compose")
    args = [binary, "--project-directory", str(REPO), "--env-file", str(env_file)]
    for path in files:
        args += ["-f", str(path)]
    result = subprocess.run([*args, "config"], cwd=REPO, capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


# ----- Prometheus -----------------------------------------------------------------------------


def retarget(config: dict[str, Any], target: str) -> tuple[dict[str, Any], list[str]]:
    """The config with every static target replaced by `target`, and the targets it had;
    jobs that discover their targets (the compose replicas' DNS) are left out."""
    replaced = []
    config["scrape_configs"] = [job for job in config["scrape_configs"] if "static_configs" in job]
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            replaced += group["targets"]
            group["targets"] = [target]
    return config, replaced


class PrometheusProcess:
    """`prometheus` on a free loopback port with its own storage; never the system one."""

    def __init__(self, config_path: Path, workdir: Path) -> None:
        binary = require_binary("prometheus", "apt-get install prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> PrometheusProcess:
        wait_until_ok(self.process, f"{self.url}/-/ready", timeout_s, 0.2,
                      lambda why: f"prometheus {why}:\n{self.log_path.read_text()}")
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        response = httpx.get(f"{self.url}/api/v1/label/{label}/values",
                             params={"match[]": match}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def active_targets(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/targets", params={"state": "active"},
                             timeout=10)
        response.raise_for_status()
        return response.json()["data"]["activeTargets"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
