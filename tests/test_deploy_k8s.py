"""The Kubernetes manifests under deploy/k8s/: valid against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields refused), and consistent with the server they
run: the args are tova-serve's, the probes hit /health and /ready, the grace period outlasts
the drain, the autoscaler's metric is one the server exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.server_utils import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate")
MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.37.0"


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "deploy" / "k8s" / name).read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_validation_refuses_an_unknown_field():
    broken = load("pdb.yaml")
    broken["spec"]["minAvalable"] = 1  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_pod_runs_tova_serve_with_probes_and_a_long_enough_grace_period():
    from server.cli import build_parser

    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])  # every flag is tova-serve's
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_timeout + pause
    assert container["ports"][0]["containerPort"] == args.port
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_service_autoscaler_and_budget_select_the_deployment():
    deployment = load("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert load("service.yaml")["spec"]["selector"].items() <= labels.items()
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = load("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    source = (REPO / "server" / "metrics" / "__init__.py").read_text()
    assert f'"{name}"' in source  # a gauge the server exports
