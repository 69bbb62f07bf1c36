"""`raysim bench` end to end: steady-state round time, overhead ratios and the start-up phases the
runner reports in its summary (passed on per run and as medians, left out when the runner has none)."""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest

import raysim.runner
from raysim.bench.e2e import PHASE_KEYS, median_phases, startup_phases, steady_round_time
from raysim.bench.workloads import WORKLOADS
from raysim.cli import main

REQUIRED = ("ray_init_s", "data_s", "workers_ready_s", "first_round_s", "teardown_s", "cpu_s")


def test_startup_phases_keeps_the_known_numeric_keys_of_the_summary():
    phases = {"ray_init_s": 1.5, "data_s": 2, "workers_ready_s": 3.0, "first_round_s": 0.5, "teardown_s": 0.25,
              "cpu_s": 4.0, "startup_s": 7.0, "note": "x", "other_s": 9.0}
    assert startup_phases({"startup_phases": phases}) == {k: float(phases[k]) for k in PHASE_KEYS}
    assert startup_phases({"status": "completed"}) is None
    assert startup_phases({"startup_phases": {"note": "x"}}) is None
    assert startup_phases(None) is None


def test_median_phases_per_key_over_the_runs_that_report_it():
    a = {"ray_init_s": 1.0, "cpu_s": 10.0}
    b = {"ray_init_s": 3.0, "cpu_s": 20.0, "startup_s": 5.0}
    c = {"ray_init_s": 8.0, "cpu_s": 30.0}
    assert median_phases([a, None, b, c]) == {"ray_init_s": 3.0, "cpu_s": 20.0, "startup_s": 5.0}
    assert median_phases([None, None]) is None and median_phases([]) is None


def test_steady_round_time_skips_two_warm_up_rounds_and_the_evaluated_last_one():
    assert steady_round_time([9.0, 8.0, 1.0, 3.0, 2.0, 7.0]) == 2.0
    assert steady_round_time([9.0, 2.0, 4.0]) == 3.0
    assert steady_round_time([5.0]) == 5.0


def fake_runner(phases_by_engine: dict[str, dict | None], round_time: float = 0.5):
    """Stands in for raysim.runner.run_experiment: writes rounds.parquet, calls on_round, returns a summary
    with the given start-up phases (none for an engine mapped to None)."""
    def run_experiment(cfg, run_dir, *, on_round=None, **_):
        run_dir.mkdir(parents=True)
        rows = [{"round": r, "round_time_s": round_time, "clients_failed": 0, "accuracy": 0.25}
                for r in range(1, cfg.federation.rounds + 1)]
        pd.DataFrame(rows).to_parquet(run_dir / "rounds.parquet")
        for row in rows:
            on_round(row, None)
        summary = {"status": "completed", "gpus_per_worker": 0.0}
        if phases_by_engine[cfg.resources.engine] is not None:
            summary["startup_phases"] = phases_by_engine[cfg.resources.engine]
        return summary
    return run_experiment


def bench_json(tmp_path, monkeypatch, engines: str, rounds: int = 4, trials: int = 1) -> dict:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--workload", "tiny", "--ks", "2", "--clients", "2", "--min-time", "0",
                 "--e2e-engines", engines, "--rounds", str(rounds), "--trials", str(trials),
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_json_holds_the_runners_startup_phases_per_run_and_as_medians(tmp_path, monkeypatch):
    peft = dict(zip(REQUIRED, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    cohort = dict(zip(REQUIRED, [3.0, 2.0, 5.0, 0.0, 1.0, 10.0]))
    monkeypatch.setattr(raysim.runner, "run_experiment", fake_runner({"peft": peft, "cohort": cohort}))
    got = bench_json(tmp_path, monkeypatch, "peft,cohort")
    assert got["e2e"]["peft"]["startup_phases"] == peft
    assert got["e2e"]["cohort"]["startup_phases"] == cohort
    assert got["startup_phases"] == {k: statistics.median([peft[k], cohort[k]]) for k in REQUIRED}
    tiny = WORKLOADS["tiny"]["config"]
    steps = tiny["federation"]["clients_per_round"] * tiny["train"]["local_steps"]
    res = got["e2e"]["cohort"]
    assert res["rounds"] == 4 and res["round_time_s"] == 0.5 and res["client_steps_per_s"] == steps / 0.5
    assert got["e2e_engine"] == "cohort" and got["overhead_ratio"] == res["overhead_ratio"]
    parallel = tiny["resources"]["num_workers"]
    assert res["overhead_ratio"] == pytest.approx(0.5 / (steps / (got["floor_client_steps_per_s"] * parallel)))


def test_trials_are_interleaved_and_reported_as_medians(tmp_path, monkeypatch):
    order, times = [], iter([0.5, 0.9, 0.7, 0.3, 0.6, 0.1])     # peft, cohort | cohort, peft | peft, cohort

    def run_experiment(cfg, run_dir, **kw):
        order.append(cfg.resources.engine)
        return fake_runner({"peft": None, "cohort": None}, round_time=next(times))(cfg, run_dir, **kw)

    monkeypatch.setattr(raysim.runner, "run_experiment", run_experiment)
    got = bench_json(tmp_path, monkeypatch, "peft,cohort", trials=3)
    assert order == ["peft", "cohort", "cohort", "peft", "peft", "cohort"]
    assert [t["round_time_s"] for t in got["e2e"]["peft"]["trials"]] == [0.5, 0.3, 0.6]
    assert got["e2e"]["peft"]["round_time_s"] == 0.5 and got["e2e"]["cohort"]["round_time_s"] == 0.7
    assert all("load_average_1m_before" in t for t in got["e2e"]["cohort"]["trials"])


def test_bench_json_leaves_the_startup_phases_out_when_the_runner_has_none(tmp_path, monkeypatch):
    monkeypatch.setattr(raysim.runner, "run_experiment", fake_runner({"cohort": None}))
    got = bench_json(tmp_path, monkeypatch, "cohort", rounds=3)
    assert "startup_phases" not in got and "startup_phases" not in got["e2e"]["cohort"]
    assert got["e2e"]["cohort"]["rounds"] == 3


@pytest.mark.ray
def test_bench_end_to_end_with_the_real_runner(tmp_path, monkeypatch, ray_local):
    summaries = []
    real = raysim.runner.run_experiment

    def spy(*args, **kwargs):
        summaries.append(real(*args, **kwargs))
        return summaries[-1]

    monkeypatch.setattr(raysim.runner, "run_experiment", spy)
    got = bench_json(tmp_path, monkeypatch, "cohort", rounds=3)
    res = got["e2e"]["cohort"]
    assert res["rounds"] == 3 and len(res["trials"][0]["round_times_s"]) == 3 and res["clients_failed"] == 0
    assert res["client_steps_per_s"] > 0 and res["startup_s"] > 0 and res["teardown_s"] >= 0
    assert got["overhead_ratio"] == res["overhead_ratio"] > 0
    (summary,) = summaries
    reported = summary["startup_phases"]                   # the runner times its phases
    assert set(REQUIRED) <= set(reported) and reported["ray_init_s"] > 0 and reported["workers_ready_s"] > 0
    assert res["startup_phases"] == {k: float(reported[k]) for k in PHASE_KEYS if k in reported}
    assert got["startup_phases"] == res["startup_phases"]
