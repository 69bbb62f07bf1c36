"""Faults end to end on the shared local Ray: corrupt uploads rejected, degraded rounds ending a run,
stragglers stopped at the deadline, a worker killed during evaluation, and run directories never reused by
accident. Checked from the files a user gets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from raysim.cli import main
from raysim.runner import run_experiment

pytestmark = pytest.mark.ray

BASE = {"federation.rounds": 2, "train.local_steps": 2, "federation.max_update_norm": 1000.0}


@pytest.fixture(scope="module")
def runs():
    return {}


def _run(runs, tiny_config, tmp_path_factory, key, **overrides):
    if key not in runs:
        out = tmp_path_factory.mktemp(key)
        run_experiment(tiny_config(**{**BASE, **overrides}), out, progress=False)
        runs[key] = out
    return runs[key]


def _tables(out):
    return pd.read_parquet(out / "rounds.parquet"), pd.read_parquet(out / "clients.parquet")


@pytest.mark.parametrize("kind", ["nan", "inf", "huge", "shape"])
def test_corrupt_uploads_are_rejected_and_equal_dropping_those_clients(ray_local, runs, tiny_config,
                                                                       tmp_path_factory, kind):
    dropped = _run(runs, tiny_config, tmp_path_factory, "drop", **{"faults.drop_rate": 0.3})
    corrupt = _run(runs, tiny_config, tmp_path_factory, kind, **{"faults.corrupt_rate": 0.3,
                                                                 "faults.corrupt_kind": kind})
    (d_rounds, d_clients), (c_rounds, c_clients) = _tables(dropped), _tables(corrupt)
    rejected = c_clients[c_clients["status"] == "rejected"]
    assert len(rejected) > 0 and rejected["error"].str.startswith("rejected: ").all()
    want = {"nan": "not finite", "inf": "not finite", "huge": "max_update_norm", "shape": "shape"}[kind]
    assert rejected["error"].str.contains(want).all()
    # the same clients fail, in the same rounds; the aggregate is the one without them
    key = ["round", "client_id"]
    assert (rejected[key].values.tolist()
            == d_clients[d_clients["status"] == "failed"][key].values.tolist())
    np.testing.assert_array_equal(c_rounds["accuracy"], d_rounds["accuracy"])
    np.testing.assert_array_equal(c_rounds["loss"], d_rounds["loss"])
    assert (c_rounds["clients_rejected"] == c_rounds["clients_failed"]).all()
    adapter = load_file(str(corrupt / "adapter" / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in adapter.values())


def test_every_round_degraded_fails_the_run_with_exit_code_3(ray_local, tmp_path, capsys):
    rc = main(["run", "experiments/tiny.yaml", "--out", str(tmp_path), "--no-progress",
               "--set", "federation.rounds=3", "--set", "train.local_steps=1", "--set", "faults.drop_rate=0.5",
               "--set", "federation.min_completed_fraction=1.0", "--set", "federation.max_degraded_rounds=0"])
    assert rc == 3 and "max_degraded_rounds" in capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "degraded" in summary["failure"]
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert list(rounds["round"]) == [1] and list(rounds["status"]) == ["degraded"]
    assert not (tmp_path / "adapter").exists()                  # a failed run leaves no model to pick up


def test_stragglers_are_cut_at_the_deadline_and_do_not_block_the_next_round(ray_local, runs, tiny_config,
                                                                           tmp_path_factory):
    out = _run(runs, tiny_config, tmp_path_factory, "slow", **{"faults.slow_fraction": 0.4,
                                                               "faults.slow_client_s": 120.0,
                                                               "federation.round_timeout_s": 4.0,
                                                               "resources.engine": "peft"})
    rounds, clients = _tables(out)
    late = clients[clients["status"] == "straggler"]
    assert len(late) > 0 and late["error"].str.contains("deadline").all()
    # a worker still sleeping through round 1's 120 s delay would make every round-2 client a straggler
    assert rounds["clients_completed"].min() > 0
    assert (rounds["clients_completed"] + rounds["clients_failed"] == rounds["clients_sampled"]).all()
    assert rounds["round_time_s"].max() < 60


def test_a_worker_killed_during_evaluation_changes_nothing(ray_local, runs, tiny_config, tmp_path_factory):
    plain = _run(runs, tiny_config, tmp_path_factory, "plain")
    killed = _run(runs, tiny_config, tmp_path_factory, "kill-eval", **{"faults.kill_worker_at_round": 1,
                                                                       "faults.kill_worker_phase": "evaluation"})
    (p_rounds, p_clients), (k_rounds, k_clients) = _tables(plain), _tables(killed)
    for col in ("accuracy", "loss", "clients_completed", "bytes_up"):
        np.testing.assert_array_equal(k_rounds[col], p_rounds[col])
    assert (k_clients["status"] == "ok").all()
    assert (k_clients[k_clients["round"] == 2]["worker"] != 0).all()   # worker 0 was killed in round 1
    assert (p_clients[p_clients["round"] == 2]["worker"] == 0).any()   # ... where it would have trained


def test_reusing_an_unfinished_out_is_refused_and_nothing_is_deleted(tmp_path, capsys):
    (tmp_path / "checkpoints" / "round-0001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round-0001" / "state.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("name: old\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main(["run", "experiments/tiny.yaml", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "config.yaml").read_text() == "name: old\n"


def test_resume_accepts_more_rounds_and_refuses_other_changes(ray_local, tmp_path, capsys):
    base = ["run", "experiments/tiny.yaml", "--out", str(tmp_path), "--no-progress", "--set", "federation.rounds=1",
            "--set", "train.local_steps=1"]
    assert main(base) == 0
    rc = main(["run", "--resume", str(tmp_path), "--no-progress", "--set", "train.lr=0.1"])
    assert rc == 2 and "train.lr" in capsys.readouterr().err
    rc = main(["run", "--resume", str(tmp_path), "--no-progress", "--set", "federation.rounds=2"])
    assert rc == 0
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert list(rounds["round"]) == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
