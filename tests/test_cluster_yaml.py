"""The cluster launch files, checked offline: cluster.yaml passes the checks `ray up` runs (Ray's autoscaler
schema) and can be launched as shipped; docs/kuberay-raycluster.yaml is a complete KubeRay RayCluster."""

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "docs" / "kuberay-raycluster.yaml"
# EC2 instance families with NVIDIA GPUs (g4dn, g5, g6, g6e, p4d, p5, ...)
GPU_FAMILY = re.compile(r"^(g\d+[a-z]*|p\d+[a-z]*)\.")
PLACEHOLDER = re.compile(r"ami-0123456789abcdef0|placeholder|todo|fixme|changeme|your[-_ ]|<[^>]*>|xxx", re.I)


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw):
    from ray.autoscaler._private.util import prepare_config, translate_trivial_legacy_config, validate_config

    cfg = copy.deepcopy(raw)
    translate_trivial_legacy_config(cfg)
    cfg = prepare_config(cfg)
    validate_config(cfg)
    return cfg


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_cluster_yaml_validates_against_the_autoscaler_schema(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_no_placeholder_is_left(raw):
    bad = [s for s in _strings(raw) if PLACEHOLDER.search(s)]
    assert not bad, f"placeholder values in cluster.yaml: {bad}"
    for name, node_type in raw["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        # resolved by AWS (or by Ray) at launch in the configured region: nothing to fill in
        assert image == "latest_dlami" or image.startswith("resolve:ssm:/aws/service/"), (name, image)


def test_dashboard_listens_on_loopback_only(prepared):
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--dashboard-host[= ]127\.0\.0\.1\b", head_start)
    every_command = [c for key, cmds in prepared.items() if key.endswith("_commands") for c in cmds]
    assert not any("0.0.0.0" in c for c in every_command)


def test_simulation_work_stays_off_the_head_and_gpu_workers_start(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert GPU_FAMILY.match(node_type["node_config"]["InstanceType"]), name
    assert any(node_type.get("min_workers", 0) >= 1 for node_type in workers.values())


@pytest.mark.parametrize("role", ["head_setup_commands", "worker_setup_commands"])
def test_every_node_installs_torch_then_this_checkout(prepared, raw, role):
    commands = prepared[role]
    checkout = next(remote for remote, local in raw["file_mounts"].items() if local == ".")
    torch_at = next(i for i, c in enumerate(commands) if re.search(r"pip install \S*torch==", c))
    project_at = next(i for i, c in enumerate(commands) if re.search(r"pip install -c \S+ -e ", c))
    assert torch_at < project_at
    assert commands[project_at].split()[-1].replace("~", "/home/ubuntu") == checkout
    # the constraints are the lock minus its torch line (each node installs its own torch build)
    constraints = next(c for c in commands[:project_at] if "requirements-lock.txt" in c)
    assert "grep -v '^torch=='" in constraints


def test_the_lock_has_the_torch_line_the_nodes_drop():
    torch_lines = [line for line in (ROOT / "requirements-lock.txt").read_text().splitlines()
                   if line.startswith("torch==")]
    assert len(torch_lines) == 1


def test_the_nodes_run_ray_from_the_project_environment(prepared):
    setup = prepared["head_setup_commands"]
    assert any("uv venv" in c and "--python 3.11" in c for c in setup)
    assert any("raysim-env/bin" in c and ".bashrc" in c for c in setup)


@pytest.fixture(scope="module")
def raycluster():
    return yaml.safe_load(KUBERAY.read_text())


def _containers(group):
    return group["template"]["spec"]["containers"]


def test_kuberay_example_is_a_raycluster_with_a_cpu_head(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = _containers(head)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_kuberay_example_has_a_gpu_worker_group(raycluster):
    groups = raycluster["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = _containers(group)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_kuberay_example_turns_on_token_auth_everywhere(raycluster):
    spec = raycluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e for e in _containers(group)[0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_kuberay_image_is_the_one_docs_cluster_md_builds(raycluster):
    images = {c["image"] for g in [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
              for c in _containers(g)}
    (image,) = images
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert f"docker build -t {image} " in docs
    assert f"FROM rayproject/ray:{raycluster['spec']['rayVersion']}-py311-gpu" in docs
