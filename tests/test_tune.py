"""Ray Tune sweeps (`raysim sweep`): validation before Ray, trials as whole simulations in their own
placement groups, trials.parquet, and resuming an interrupted sweep without redoing finished work.

The integration test shares the session Ray of conftest (8 logical CPUs, 1 logical GPU). A trial of the
tiny config needs 1 CPU (trial + zero-CPU coordinator) + 2 workers × (1 CPU, 0.25 GPU): two trials run
at once and reserve 6 of the 8 CPUs, so workers that escaped their trial's placement group would not fit
and the sweep would stall — the sweep finishing is itself the check that the nested actors are packed
into the trial's bundles.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from conftest_s3 import s3_server  # noqa: F401 - the fixture
from raysim.cli import main
from raysim.config import ConfigError
from raysim.tune import parse_sweep, run_sweep, trial_bundles, trial_config, trial_label

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "tiny.yaml")
FAST = {"federation.rounds": 2, "train.local_steps": 2}


def sweep(search_space, set_=None, **extra) -> dict:
    return {"name": "t", "base": TINY, "set": {**FAST, **(set_ or {})}, "search_space": search_space, **extra}


def files_state(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of a run's outputs (each part file, where a Parquet output is a dataset directory)."""
    paths = []
    for name in ("rounds.parquet", "clients.parquet", "summary.json"):
        path = run_dir / name
        paths += sorted(path.iterdir()) if path.is_dir() else [path]
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


# ----------------------------------------------------------------------------------------- no Ray


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the sweep gets as far as starting Ray or Tune."""
    from raysim.tune import driver

    def boom(*a, **k):
        raise AssertionError("Ray/Tune was started for an invalid sweep")
    monkeypatch.setattr(driver, "start_sweep_ray", boom)
    monkeypatch.setattr(driver, "make_callback", boom)


@pytest.mark.parametrize("raw, expected", [
    (sweep({"lora.rnak": [4, 8]}), ["search_space.lora.rnak", "unknown key"]),
    (sweep({"lora.rank": {"grid_search": []}}), ["search_space.lora.rank.grid_search", "empty grid"]),
    (sweep({"train.lr": {"gaussian": [0, 1]}}), ["search_space.train.lr", "grid_search, choice, uniform"]),
    (sweep({"train.lr": {"uniform": [0.1, 0.01]}}), ["search_space.train.lr.uniform", "low must be < high"]),
    (sweep({"train.lr": {"loguniform": [0, 0.1]}}), ["search_space.train.lr.loguniform", "> 0"]),
    (sweep({"lora.rank": {"randint": [2.5, 8]}}), ["search_space.lora.rank.randint", "integers"]),
    (sweep({"aggregator.name": ["fedit", "nope"]}), ["search_space.aggregator.name='nope'", "unknown aggregator"]),
    (sweep({"lora.rank": [4, 0]}), ["search_space.lora.rank=0", "lora.rank"]),
    (sweep({"federation.clients_per_round": [2, 6], "federation.num_clients": [5, 8]}),
     ["combination", "federation.clients_per_round=6, federation.num_clients=5"]),
    (sweep({"federation.num_clients": [8, 5000]}), ["federation.num_clients=5000"]),
    (sweep({}), ["search_space: empty"]),
    ({**sweep({"lora.rank": [4]}), "serach_space": {}}, ["serach_space: unknown sweep key"]),
    ({**sweep({"lora.rank": [4]}), "base": "no/such/file.yaml"}, ["base: config file not found"]),
    ({**sweep({"lora.rank": [4]}), "set": {"train.nope": 1}}, ["base: train.nope: unknown key"]),
    ({**sweep({"seed": [0, 1]}), "seeds": [0, 1]}, ["search_space.seed", "seeds"]),
    ({**sweep({"lora.rank": [4]}), "seeds": []}, ["seeds: must be a non-empty list"]),
    ({**sweep({"lora.rank": [4]}), "metric": "acc"}, ["metric: unknown metric 'acc'"]),
    ({**sweep({"lora.rank": [4]}), "scheduler": {"name": "hyperband"}}, ["scheduler.name"]),
    ({**sweep({"lora.rank": [4]}), "scheduler": {"name": "asha", "grace_period": 3}},
     ["scheduler.grace_period", "2 rounds"]),
])
def test_bad_sweep_files_fail_before_ray_naming_the_key(no_ray, raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_sweep(raw)
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_cli_reports_a_bad_sweep_with_exit_code_2(no_ray, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep({"lora.rank": {"grid_search": []}})))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "search_space.lora.rank.grid_search: empty grid" in err
    assert not (tmp_path / "out").exists()


def test_sweep_file_parsing_resolves_base_and_expands_seeds(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.yaml").write_text(yaml.safe_dump(
        {"base": "../base.yaml", "search_space": {"aggregator.name": ["fedit", "fedex"],
                                                  "train.lr": {"loguniform": [1e-4, 1e-2]}},
         "seeds": [0, 1, 2], "num_samples": 2, "scheduler": "asha"}))
    (tmp_path / "base.yaml").write_text(Path(TINY).read_text())
    from raysim.tune import load_sweep

    spec = load_sweep(tmp_path / "sub" / "s.yaml")
    assert spec.name == "s" and spec.base["model"]["name"] == "random:bert-tiny"
    assert list(spec.search_space) == ["aggregator.name", "train.lr"] and spec.seeds == [0, 1, 2]
    assert spec.num_trials() == 2 * 3 * 2
    assert spec.scheduler == {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 3}
    again = parse_sweep(spec.to_yaml_dict())                   # the sweep.yaml copy is self-contained
    assert again.search_space == spec.search_space and again.base == spec.base
    longer = load_sweep(tmp_path / "sub" / "s.yaml", overrides=["federation.rounds=5"])   # raysim sweep --set
    assert longer.base["federation"]["rounds"] == 5 and longer.scheduler["max_t"] == 5


def test_trial_resources_follow_the_trial_config():
    base = yaml.safe_load(Path(TINY).read_text())
    cfg = trial_config(base, {"resources.num_workers": 3, "resources.gpus_per_worker": 0.25})
    assert trial_bundles(cfg) == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.25}] * 3
    cfg = trial_config(base, {"resources.cpus_per_worker": 0, "resources.gpus_per_worker": 0})
    assert trial_bundles(cfg) == [{"CPU": 1.0}]                  # zero-resource workers need no bundle
    # gpus_per_worker: auto becomes concrete per trial: the whole visible GPU split over the workers
    assert trial_config(base, {}, cluster_gpus=1.0).resources.gpus_per_worker == 0.5
    assert trial_config(base, {}, cluster_gpus=0.0).resources.gpus_per_worker == 0.0
    assert trial_config(base, {"lora.rank": 8}, checkpoint_every=3).output.checkpoint_every == 3
    assert trial_label(3, {"aggregator.name": "fedex", "data.partition.alpha": 0.1, "seed": 1}) == \
        "0003_aggregator=fedex_alpha=0.1_seed=1"
    # a whole section as a grid value is named by its name and keys, a list by its items
    assert trial_label(5, {"aggregator": {"name": "lora_fair", "lam": 0.01}, "seed": 0}) == \
        "0005_aggregator=lora_fair-lam=0.01_seed=0"
    assert trial_label(6, {"lora.target_modules": ["query", "value"]}) == "0006_target_modules=query-value"


def test_rewind_aligns_the_run_dir_with_tunes_last_checkpoint(tmp_path):
    from raysim.tune.trial import rewind_to_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert rewind_to_checkpoint(run, 3) is None     # no config.yaml: start afresh
    (run / "config.yaml").write_text("name: x\n")
    assert rewind_to_checkpoint(run, 3) is None     # no raysim checkpoint: start afresh
    for r in (3, 4):
        (run / "checkpoints" / f"round-{r:04d}").mkdir()
    assert rewind_to_checkpoint(run, 3) == 3        # Tune saw round 3: round 4 is redone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0003"]
    assert rewind_to_checkpoint(run, 1) == 3        # Tune's round is gone: the latest one
    for r in (9999, 10000):
        (run / "checkpoints" / f"round-{r:04d}").mkdir()
    assert rewind_to_checkpoint(run, 1) == 10000    # the latest by round number, not by name


def _round_row(rnd: int, acc: float) -> dict:
    return {"round": rnd, "wall_s": float(rnd), "round_time_s": 1.0, "accuracy": acc, "loss": 1.0 / rnd,
            "bytes_up": 100 * rnd, "bytes_down": 1000 * rnd, "clients_sampled": 2, "clients_completed": 2,
            "clients_failed": 0, "aggregator": "fedit"}


def test_trial_bookkeeping_reads_and_writes_the_sweeps_object_store(s3_server):  # noqa: F811 - the fixture
    """What a trial and the trials table do with a run directory in S3: rewind its checkpoints to Tune's,
    re-total the rounds kept, summarise it, and write trials.parquet."""
    import numpy as np

    from raysim.checkpoint import checkpoint_rounds, save_checkpoint
    from raysim.metrics import RunWriter
    from raysim.storage import RunStorage
    from raysim.tune.table import run_dir_metrics, write_trials
    from raysim.tune.trial import MetricTracker, rewind_to_checkpoint

    uri = s3_server.uri()
    writer = RunWriter(uri)
    writer.write_config({"name": "x", "federation": {"rounds": 4}})
    for rnd, acc in ((1, 0.25), (2, 0.5), (3, 0.375)):
        writer.add_round(_round_row(rnd, acc), [])
        save_checkpoint(uri, {"w": np.full(2, rnd, dtype=np.float32)}, {"round": rnd}, keep=3)
    assert rewind_to_checkpoint(uri, 2) == 2
    assert [r for r, _ in checkpoint_rounds(uri)] == [1, 2]
    tracker = MetricTracker(uri, up_to_round=2)
    final = tracker.final()
    assert final["round"] == 2 and final["accuracy"] == 0.5 and final["best_accuracy"] == 0.5
    assert final["bytes_up_total"] == 100 + 200 and final["bytes_down_total"] == 1000 + 2000
    row = run_dir_metrics(uri)
    assert row["status"] == "unfinished" and row["rounds_done"] == 3 and row["rounds"] == 4
    assert row["best_accuracy"] == 0.5 and row["best_round"] == 2 and row["bytes_up"] == 600
    assert row["run_dir"] == RunStorage.of(uri).uri()
    RunStorage.of(uri).write_text("summary.json", "{}")
    assert run_dir_metrics(uri)["status"] == "completed"
    table = pd.DataFrame([{"trial": "0000_x=1", **run_dir_metrics(uri)}])
    where = write_trials(table, uri)
    assert where == RunStorage.of(uri).uri("trials.parquet")
    pd.testing.assert_frame_equal(RunStorage.of(uri).read_parquet("trials.parquet").to_pandas(), table)


def test_a_node_local_sweep_dir_is_refused_on_a_cluster_of_several_nodes(monkeypatch, tmp_path):
    import ray

    from raysim.tune.driver import refuse_node_local

    alive = {"Alive": True}
    monkeypatch.delenv("RAYSIM_SHARED_OUT", raising=False)
    monkeypatch.setattr(ray, "nodes", lambda: [alive, alive, {"Alive": False}])
    with pytest.raises(ConfigError, match=r"local disk, but the Ray cluster has 2 nodes.*RAYSIM_SHARED_OUT=1"):
        refuse_node_local(tmp_path / "sweep")
    with pytest.raises(ConfigError, match="local disk"):
        refuse_node_local(f"file://{tmp_path}/sweep")
    refuse_node_local("s3://bucket/sweep")                        # shared storage
    monkeypatch.setenv("RAYSIM_SHARED_OUT", "1")
    refuse_node_local(tmp_path / "sweep")                         # a path the user says every node mounts
    monkeypatch.delenv("RAYSIM_SHARED_OUT")
    monkeypatch.setattr(ray, "nodes", lambda: [alive, {"Alive": False}])
    refuse_node_local(tmp_path / "sweep")                         # one live node: its disk is the cluster's
    assert not (tmp_path / "sweep").exists()


def test_sweep_help_says_resume_trusts_the_directory(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "s3://bucket/prefix" in text and "only resume a sweep directory you trust" in text


def test_stop_after_trials_sends_tunes_interrupt_signal_once(monkeypatch, tmp_path):
    from raysim.tune.driver import Progress

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    progress = Progress(trials_dir=tmp_path, stop_after=2, quiet=True)
    trial = SimpleNamespace(path=str(tmp_path / "0000_x=1"), last_result={})
    progress.trial_done(trial, error=False)
    assert sent == []
    progress.trial_done(trial, error=True)
    progress.trial_done(trial, error=False)
    assert sent == [(os.getpid(), signal.SIGUSR1)]               # Tune's own interrupt: state saved, resumable


def test_a_callback_restored_from_tunes_state_reports_to_the_live_driver(monkeypatch, tmp_path, capsys):
    """On --resume Tune unpickles the callback saved with the experiment: it must count and print the
    trials of this invocation (its --stop-after-trials, its quiet flag), not those of the first run."""
    import ray.cloudpickle

    from raysim.tune import driver

    monkeypatch.setattr(driver, "_ACTIVE", driver.Progress(tmp_path, stop_after=1, quiet=True))
    saved = ray.cloudpickle.dumps(driver.make_callback())       # as Tuner() saves it on the first run
    live = driver.Progress(tmp_path, stop_after=None, quiet=False)
    monkeypatch.setattr(driver, "_ACTIVE", live)
    restored = ray.cloudpickle.loads(saved)
    (tmp_path / "0001_rank=8").mkdir()
    (tmp_path / "0001_rank=8" / "summary.json").write_text("{}")
    restored.on_trial_complete(0, [], SimpleNamespace(path=str(tmp_path / "0001_rank=8"),
                                                      last_result={"round": 3, "accuracy": 0.5}))
    assert live.finished == 1 and not live.stopping
    assert "[sweep] 0001_rank=8: completed  accuracy 0.5000" in capsys.readouterr().out


def test_importing_the_package_loads_neither_ray_nor_torch():
    code = ("import sys, raysim.tune; "
            "print(sorted(m for m in ('ray', 'ray.tune', 'torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------- with Ray

def _idle_sigusr1(*_):
    """SIGUSR1 handler outside Tune's run: a signal that arrives late must not end the test process."""


@pytest.fixture
def tune_interrupt():
    previous = signal.signal(signal.SIGUSR1, _idle_sigusr1)
    yield interrupt_when
    signal.signal(signal.SIGUSR1, previous)


def interrupt_when(condition, timeout_s: float = 600) -> tuple[threading.Thread, threading.Event]:
    """A watcher thread that sends this process Tune's interrupt signal (SIGUSR1, handled like Ctrl+C)
    once `condition()` holds while Tune's handler is installed (during `fit`)."""
    fired = threading.Event()

    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                ready = condition()
            except Exception:  # noqa: BLE001 - files not there yet or being rewritten
                ready = False
            if ready and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None, _idle_sigusr1):
                fired.set()
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, fired


@pytest.mark.ray
def test_grid_sweep_interrupted_mid_trial_resumes_without_redoing_finished_work(ray_local, tune_interrupt,
                                                                               tmp_path):
    """2×2 grid, 4 trials × 2 nested workers, 2 at a time. Interrupted (as by Ctrl+C) once two trials are
    done and a third is mid-run; the resumed sweep keeps the finished trials and the third one's rounds."""
    rounds = 6
    spec = parse_sweep(sweep({"aggregator.name": {"grid_search": ["fedit", "fedex"]},
                              "data.partition.alpha": {"grid_search": [0.1, 100]}},
                             set_={"federation.rounds": rounds, "resources.gpus_per_worker": 0.25},
                             max_concurrent_trials=2))
    out = tmp_path / "sweep"
    trials = out / "trials"

    def two_done_and_one_mid_run() -> bool:
        runs = [d for d in trials.iterdir() if (d / "rounds.parquet").exists()]
        done = [d for d in runs if (d / "summary.json").exists()]
        mid = [d for d in runs if d not in done and 2 <= len(pd.read_parquet(d / "rounds.parquet")) <= 3]
        return len(done) >= 2 and bool(mid)

    sigint = signal.getsignal(signal.SIGINT)
    watcher, fired = tune_interrupt(two_done_and_one_mid_run)
    first = run_sweep(spec, out, quiet=True)
    watcher.join(timeout=5)
    assert fired.is_set(), "the sweep finished before it could be interrupted"
    assert signal.getsignal(signal.SIGINT) is sigint              # Tune's Ctrl+C handler does not outlive it
    status = dict(zip(first["trial"], first["status"]))
    assert 2 <= list(status.values()).count("completed") < 4, status
    assert "unfinished" in status.values() and set(status.values()) <= {"completed", "unfinished", "pending"}
    finished = {t: files_state(trials / t) for t, st in status.items() if st == "completed"}
    partial = {t: pd.read_parquet(trials / t / "rounds.parquet") for t, st in status.items() if st == "unfinished"}
    assert any(2 <= len(p) <= rounds for p in partial.values())

    table = run_sweep(None, out, resume=True, quiet=True)
    assert len(table) == 4 and (table["status"] == "completed").all(), table[["trial", "status", "error"]]
    assert list(pd.read_parquet(out / "trials.parquet")["trial"]) == list(table["trial"])
    # one row per grid point, the swept values as columns named by dotted key
    assert {"aggregator.name", "data.partition.alpha", "seed", "accuracy", "loss", "deviation_rel",
            "best_accuracy", "rounds_done", "bytes_up", "bytes_down", "run_dir"} <= set(table.columns)
    assert sorted(zip(table["aggregator.name"], table["data.partition.alpha"])) == \
        [("fedex", 0.1), ("fedex", 100.0), ("fedit", 0.1), ("fedit", 100.0)]
    assert (table["rounds_done"] == rounds).all() and (table["seed"] == 0).all()
    assert table["accuracy"].between(0, 1).all() and (table["bytes_up"] > 0).all()
    fedex = table[table["aggregator.name"] == "fedex"]
    fedit = table[table["aggregator.name"] == "fedit"]
    assert (fedex["deviation_rel"] < 1e-5).all() and (fedit["deviation_rel"] > 1e-4).all()

    # trials finished before the interruption were not run again
    for trial, state in finished.items():
        assert files_state(trials / trial) == state, trial
    # an interrupted trial kept the rounds it had done (a restart would give new timings), except at most
    # the one round that raced with the interrupt, redone from the previous checkpoint
    for trial, before in partial.items():
        after = pd.read_parquet(trials / trial / "rounds.parquet")
        assert list(after["round"]) == list(range(1, rounds + 1))
        kept = before.iloc[:len(before) - 1].reset_index(drop=True)
        pd.testing.assert_frame_equal(after.iloc[:len(kept)].reset_index(drop=True), kept)
        # and Tune's iteration count stayed in step with the simulation's rounds
        last = pd.read_json(out / "tune" / trial / "result.json", lines=True).iloc[-1]
        assert last["round"] == rounds and last["training_iteration"] == rounds

    for _, row in table.iterrows():
        run_dir = Path(row["run_dir"])
        assert run_dir.parent == trials
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["aggregator"]["name"] == row["aggregator.name"]
        assert cfg["data"]["partition"]["alpha"] == row["data.partition.alpha"]
        assert cfg["resources"]["num_workers"] == 2 and cfg["resources"]["gpus_per_worker"] == 0.25
        clients = pd.read_parquet(run_dir / "clients.parquet")
        assert set(clients["worker"]) == {0, 1}                 # each trial trained on its 2 nested workers
    assert yaml.safe_load((out / "sweep.yaml").read_text())["search_space"] == spec.search_space


@pytest.mark.ray
def test_a_trial_larger_than_the_cluster_is_refused_before_tune_starts(ray_local, tmp_path):
    spec = parse_sweep(sweep({"lora.rank": [4]}, set_={"resources.gpus_per_worker": 1}))   # 2 GPUs, cluster has 1
    with pytest.raises(ConfigError, match="a trial needs 2 GPUs"):
        run_sweep(spec, tmp_path / "sweep", quiet=True)
    assert not (tmp_path / "sweep").exists()


def test_a_local_sweep_counts_the_trial_driver_apart_from_the_cores(monkeypatch):
    """A trial = its driver (1 logical CPU, mostly waiting) + its workers: on 2 cores a 2-worker trial fits
    (3 logical CPUs), a 3-worker one is refused; the cores themselves are never inflated."""
    import ray

    import raysim.runner
    from raysim.errors import ConfigError
    from raysim.tune.driver import start_sweep_ray

    started = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.update(k))
    monkeypatch.setattr(raysim.runner.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert start_sweep_ray(None, 3.0, None, False) and started["num_cpus"] == 3
    with pytest.raises(ConfigError, match="resources.num_workers"):
        start_sweep_ray(None, 4.0, None, False)
