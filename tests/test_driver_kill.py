"""A driver killed with SIGKILL mid-run (a real subprocess, like a lost machine) resumes with
`raysim run --resume DIR` to exactly the rows of an uninterrupted run — for every registered aggregator
and both engines. The subprocess joins the test session's Ray instance, so no second Ray starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raysim.aggregators import REGISTRY
from raysim.cli import main
from raysim.runner import run_experiment

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {"federation.rounds": 3, "train.local_steps": 1, "resources.num_workers": 1,
             "output.checkpoint_every": 1}
TIMINGS = {"wall_s", "round_time_s", "dispatch_s", "aggregate_s", "train_time_s", "worker"}

# the killed driver: runs the tiny config, says when round 2 is written, then waits to be killed
DRIVER = """
import sys, time
from pathlib import Path
import ray
from raysim.config import load_config
from raysim.runner import run_experiment
address, out, flag, *sets = sys.argv[1:]
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
def hold(row, ckpt):
    if row["round"] == 2:
        Path(flag).write_text("round 2 written")
        time.sleep(600)
run_experiment(load_config("experiments/tiny.yaml", sets), Path(out), progress=False, on_round=hold)
"""


def _sets(name, engine):
    return [f"{k}={v}" for k, v in {**OVERRIDES, "aggregator.name": name, "resources.engine": engine}.items()]


def _start_driver(ray_local, out: Path, sets: list[str]):
    flag = out.parent / f"{out.name}.flag"
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, address, str(out), str(flag), *sets], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, flag


def _kill_after_round_2(proc, flag: Path) -> None:
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the driver never finished round 2"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _table(out: Path, name: str) -> pd.DataFrame:
    df = pd.read_parquet(out / name)
    keys = ["round", "client_id"] if "client_id" in df else ["round"]
    return df.drop(columns=[c for c in TIMINGS if c in df]).sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize("engine", ["peft", "cohort"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_resume_after_a_killed_driver_equals_an_uninterrupted_run(ray_local, tmp_path, tiny_config, name, engine):
    sets = _sets(name, engine)
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc, flag = _start_driver(ray_local, killed, sets)          # runs while the reference run below does
    run_experiment(tiny_config(**dict(s.split("=", 1) for s in sets)), full, progress=False)
    _kill_after_round_2(proc, flag)
    assert not (killed / "summary.json").exists()
    assert main(["run", "--resume", str(killed), "--no-progress"]) == 0
    for table in ("rounds.parquet", "clients.parquet"):
        pd.testing.assert_frame_equal(_table(killed, table), _table(full, table))


def test_resume_of_a_per_client_fedsa_run_with_10000_clients(ray_local, tmp_path, tiny_config):
    """Per-client data at 10,000 clients with FedSA-LoRA (a B matrix per client, kept in the client-state store
    on disk): the killed and resumed run equals the uninterrupted one, per-client state included (the clients'
    personalised metrics depend on their stored B)."""
    sets = _sets("fedsa", "cohort") + ["data.synthetic.examples_per_client=8", "data.test_clients=20",
                                       "federation.num_clients=10000", "federation.clients_per_round=40",
                                       "federation.rounds=4", "eval.personalized=true"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc, flag = _start_driver(ray_local, killed, sets)
    run_experiment(tiny_config(**dict(s.split("=", 1) for s in sets)), full, progress=False)
    _kill_after_round_2(proc, flag)
    assert main(["run", "--resume", str(killed), "--no-progress"]) == 0
    for table in ("rounds.parquet", "clients.parquet"):
        pd.testing.assert_frame_equal(_table(killed, table), _table(full, table))
    rounds = _table(full, "rounds.parquet")
    assert rounds["personalized_accuracy"].notna().all() and len(rounds) == 4
    assert any((full / "client_state").rglob("*"))            # FedSA's B_k live on disk
