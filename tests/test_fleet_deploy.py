"""The deploy files give a fleet one shared state directory and sticky continuations: compose's
replicas and the Kubernetes pods all mount one volume (ReadWriteMany in Kubernetes) at the
--state-store-dir their args name, writable by the image's user, and the shipped HAProxy
config is valid and learns response ids from the header the server sends them in.
No Docker engine or cluster needed (tests/test_fleet_conversations.py runs the fleet)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from server.cli import build_parser, configs
from server.http.request_log import REQUEST_ID_HEADER
from server.serving.response_lookup import DOCS
from tests.deploy_utils import COMPOSE, DOCKERFILE, compose_config
from tests.server_utils import REPO

HAPROXY_CONFIG = REPO / "docker" / "haproxy" / "haproxy.cfg"
K8S = REPO / "deploy" / "k8s"


def state_dir(argv: list[str]) -> PurePosixPath:
    engine, _ = configs(build_parser().parse_args(argv))
    assert engine.state_store_dir is not None, argv
    return PurePosixPath(engine.state_store_dir)


def image_user_owns(path: PurePosixPath) -> bool:
    """The Dockerfile gives the server's user this folder (a new volume mounted on it takes
    its ownership)."""
    owned = re.findall(r"chown -R tova:tova (\S+)", DOCKERFILE.read_text())
    return any(path == PurePosixPath(folder) for folder in owned)


def test_compose_replicas_share_one_named_volume_at_their_state_dir(tmp_path):
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    project = compose_config(env_file, COMPOSE)
    replica = project["services"]["replica"]
    directory = state_dir(replica["command"])
    volumes = {PurePosixPath(v.split(":")[1]): v.split(":")[0] for v in replica["volumes"]}
    # The deepest mount holding the directory is a named volume of the project's.
    holder = max((target for target in volumes if directory.is_relative_to(target)),
                 key=lambda target: len(target.parts))
    assert volumes[holder] == "tova-states" and "tova-states" in project["volumes"]
    assert image_user_owns(holder), holder
    assert replica["deploy"]["replicas"] >= 2  # one service: every replica mounts it


def test_kubernetes_pods_mount_a_read_write_many_claim_at_their_state_dir():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    claim = yaml.safe_load((K8S / "pvc.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    directory = state_dir(container["args"])
    (mount,) = [m for m in container["volumeMounts"]
                if directory.is_relative_to(PurePosixPath(m["mountPath"]))]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod, any node
    user = re.search(r"^USER (\d+):(\d+)", DOCKERFILE.read_text(), re.M)
    assert pod["securityContext"]["fsGroup"] == int(user.group(2))


def test_haproxy_config_is_valid_and_learns_the_ids_the_server_sends():
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    result = subprocess.run([binary, "-c", "-f", str(HAPROXY_CONFIG)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    text = HAPROXY_CONFIG.read_text()
    header = REQUEST_ID_HEADER.decode()
    assert f"stick store-response res.hdr({header})" in text
    assert "stick match req.body,json_query('$.previous_response_id')" in text
    assert "option http-buffer-request" in text  # req.body needs the body buffered


def test_the_404_links_a_section_that_exists():
    path, anchor = DOCS.split("#")
    headings = re.findall(r"^#+ (.+)$", (REPO / path).read_text(), re.M)
    assert anchor in {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
