"""A run on a real two-node Ray cluster (ray.cluster_utils.Cluster on this machine) survives losing a node
mid-run: the lost workers' clients are retried on the surviving worker or recorded as failed with their
reason, the pool shrinks when the cluster has no room for replacements, and every output is written."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raysim.runner import run_experiment

pytestmark = pytest.mark.ray


@pytest.fixture
def two_nodes():
    """A head node with 1 CPU and a second node with 2; only what this fixture started is stopped."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()                                   # the session's shared Ray restarts lazily afterwards
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    side = cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        yield cluster, side
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_losing_a_node_mid_run_completes_every_round(two_nodes, tmp_path, tiny_config, monkeypatch):
    cluster, side = two_nodes
    monkeypatch.setenv("RAYSIM_SHARED_OUT", "1")                 # tmp_path is visible to both "nodes"
    cfg = tiny_config(**{"resources.num_workers": 3, "federation.rounds": 4, "train.local_steps": 30,
                         "resources.worker_start_timeout_s": 8, "federation.round_timeout_s": 120})

    def lose_the_second_node(row, ckpt):
        if row["round"] == 1:                                     # round 2 is already training
            cluster.remove_node(side)

    summary = run_experiment(cfg, tmp_path, progress=False, on_round=lose_the_second_node)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    assert list(rounds["round"]) == [1, 2, 3, 4]
    assert rounds["workers"].iloc[0] == 3                        # one worker on the head, two on the other node
    assert rounds["workers"].iloc[-1] == 1                        # no room for replacements: the pool shrank
    assert (rounds["clients_completed"] + rounds["clients_failed"] == rounds["clients_sampled"]).all()
    assert rounds["clients_completed"].iloc[2:].eq(cfg.federation.clients_per_round).all()
    failed = clients[clients["status"] != "ok"]
    assert failed["error"].notna().all()
    assert rounds["accuracy"].notna().all()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == summary["status"] == "completed"


def test_raysim_run_with_address_joins_a_running_cluster(two_nodes, tmp_path):
    """`raysim run --address <head>` from another shell (a subprocess) runs on that cluster, not a private one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ray

    cluster, _ = two_nodes
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAYSIM_SHARED_OUT": "1", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "raysim", "run", "experiments/tiny.yaml", "--address", cluster.address,
                           "--out", str(tmp_path / "run"), "--no-progress", "--set", "federation.rounds=1",
                           "--set", "train.local_steps=1"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["cluster"] == {"gcs_address": cluster.gcs_address, "nodes": 2}
