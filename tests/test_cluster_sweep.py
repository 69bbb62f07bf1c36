"""A sweep on a two-node Ray cluster with its outputs in S3: the trials run on a node other than the
driver's, write their run directories and Tune's checkpoints to an S3-compatible server (moto on
127.0.0.1, see conftest_s3), `raysim sweep --resume` continues from the bucket without rerunning anything,
and `raysim report` reads the sweep from the bucket.

The head node has no CPUs (as in the shipped cluster.yaml), so every trial (1 CPU) runs on the second
node and nothing the driver writes locally could stand in for shared storage. Each trial has one worker
that asks for no CPU, so both trials fit the second node's 2 CPUs at once.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from conftest_s3 import s3_server  # noqa: F401 - the fixture
from raysim.cli import main
from raysim.config import ConfigError
from raysim.storage import RunStorage
from raysim.tune import parse_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "sweep_smoke.yaml"


def tiny_smoke_sweep():
    """experiments/sweep_smoke.yaml shrunk to 2 trials (fedit, fedex) of 2 rounds with one worker each."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["set"] = {**raw["set"], "federation.rounds": 2, "train.local_steps": 2, "resources.num_workers": 1,
                  "resources.cpus_per_worker": 0}
    raw["search_space"] = {"aggregator.name": {"grid_search": ["fedit", "fedex"]}}
    raw["seeds"] = [0]
    return parse_sweep(raw, base_dir=SMOKE.parent, default_name="sweep_smoke")


def objects(fs: pafs.FileSystem, root: str) -> dict[str, tuple[int, int]]:
    """Every object under `root` in the bucket: relative key -> (mtime in ns, size)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root) + 1:]: (i.mtime_ns, i.size) for i in infos if i.type == pafs.FileType.File}


@pytest.fixture
def two_node_cluster():
    """Head with 0 CPUs (the driver's node) + a node with 2 CPUs, joined by this process; the session's
    shared Ray is stopped first (conftest's ray_local restarts it for later tests)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        worker_node = cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        yield cluster, worker_node
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.ray
def test_sweep_on_two_nodes_writes_to_s3_resumes_and_reports_from_it(two_node_cluster, s3_server,  # noqa: F811
                                                                     tmp_path, capsys):
    import ray

    cluster, worker_node = two_node_cluster
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    head = next(n for n in nodes if n["NodeID"] != worker_node.node_id)
    assert head["Resources"].get("CPU", 0) == 0                  # so every trial runs on the other node
    spec = tiny_smoke_sweep()

    # a sweep directory on this machine's disk is refused on a multi-node cluster, before anything is written
    with pytest.raises(ConfigError, match="local disk.*2 nodes.*s3://"):
        run_sweep(spec, tmp_path / "local", quiet=True)
    assert not (tmp_path / "local").exists()

    uri = s3_server.uri("sweeps/x")
    table = run_sweep(spec, uri, quiet=True)
    assert len(table) == 2 and (table["status"] == "completed").all(), table[["trial", "status", "error"]]
    assert sorted(table["aggregator.name"]) == ["fedex", "fedit"] and (table["rounds_done"] == 2).all()
    assert table["accuracy"].between(0, 1).all() and (table["bytes_up"] > 0).all()
    sweep = RunStorage.of(uri)
    for _, row in table.iterrows():
        assert row["run_dir"] == sweep.uri(f"trials/{row['trial']}")

    # everything is in the bucket: raysim's files and Tune's state and checkpoints
    fs, root = s3_server.filesystem(), f"{s3_server.bucket}/sweeps/x"
    stored = objects(fs, root)
    assert {"sweep.yaml", "trials.parquet"} <= set(stored)
    assert any(k.startswith("tune/experiment_state") for k in stored)
    for trial in table["trial"]:
        for name in ("config.yaml", "summary.json", "rounds.parquet/round-000001.parquet",
                     "rounds.parquet/round-000002.parquet", "checkpoints/round-0002/state.json",
                     "adapter/adapter_config.json"):
            assert f"trials/{trial}/{name}" in stored, (trial, name)
        assert any(k.startswith(f"tune/{trial}/checkpoint_") for k in stored), trial
    run_files = {k: v for k, v in stored.items() if k.startswith("trials/")}

    # --resume from the same URI: Tune restores from the bucket, finished trials are not run again
    assert main(["sweep", "--resume", uri]) == 0
    assert "2 completed" in capsys.readouterr().out
    assert {k: v for k, v in objects(fs, root).items() if k.startswith("trials/")} == run_files
    resumed = sweep.read_parquet("trials.parquet").to_pandas()
    assert list(resumed["trial"]) == list(table["trial"]) and (resumed["status"] == "completed").all()

    # the report reads the sweep from the bucket and is written to a local folder
    assert main(["report", uri, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "# Sweep report: sweep_smoke" in text and f"- directory: `{sweep.uri()}`" in text
    assert "- trials: 2 (2 completed)" in text
    assert all(f"| {t} | " in text for t in table["trial"])
    assert (tmp_path / "report" / "accuracy_curves.png").is_file()       # per-round rows read from S3
