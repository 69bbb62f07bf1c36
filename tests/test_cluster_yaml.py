"""cluster.yaml passes the checks `ray up` runs (Ray's autoscaler schema), offline."""

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_the_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, translate_trivial_legacy_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    translate_trivial_legacy_config(raw)
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    assert cfg["available_node_types"]["gpu_worker"]["min_workers"] >= 1
    assert any("pip install -e" in c for c in cfg["worker_setup_commands"])
