"""End-to-end runs: the real runner (Ray, coordinator, workers, aggregation, metrics files) on a
workload; steady-state round time from inside the coordinator, start-up and teardown from here, and
the start-up phases the runner reports in its summary."""

from __future__ import annotations

import numbers
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# keys of the runner's summary["startup_phases"] (seconds) that the bench passes on: wall time of
# ray.init, of data preparation, until the workers were ready, of the first round, of teardown, the
# driver's CPU seconds for the run, and wall time from the run's start to the first round dispatched
PHASE_KEYS = ("ray_init_s", "data_s", "workers_ready_s", "first_round_s", "teardown_s", "cpu_s", "startup_s")


def startup_phases(summary: Any) -> dict[str, float] | None:
    """The start-up phases of a run summary, or None when the runner did not report them."""
    phases = summary.get("startup_phases") if isinstance(summary, dict) else None
    if not isinstance(phases, dict):
        return None
    out = {k: float(phases[k]) for k in PHASE_KEYS
           if isinstance(phases.get(k), numbers.Real) and not isinstance(phases[k], bool)}
    return out or None


def median_phases(trials: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Per key, the median over the trials that report it; None when none does."""
    reported = [t for t in trials if t]
    keys = [k for k in PHASE_KEYS if any(k in t for t in reported)]
    if not keys:
        return None
    return {k: statistics.median(t[k] for t in reported if k in t) for k in keys}


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's runs as one: the median of every numeric field, the phases' medians, and the raw runs
    (with the machine's load before each) under "trials"."""
    first = results[0]
    out = {k: v for k, v in first.items() if not isinstance(v, (numbers.Real, list, dict)) or isinstance(v, bool)}
    for k, v in first.items():
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in results if r.get(k) is not None)
    phases = median_phases([r.get("startup_phases") for r in results])
    if phases is not None:
        out["startup_phases"] = phases
    out["trials"] = results
    return out


def steady_round_time(times: list[float]) -> float:
    """Median round time without 2 warm-up rounds and the last one (it holds the only global
    evaluation); shorter runs keep what they can."""
    steady = times[2:-1] if len(times) > 3 else times[1:] or times
    return statistics.median(steady)


def run_e2e(cfg, engine: str, rounds: int, address: str | None, verbose: bool) -> dict[str, Any]:
    """One run of the real runner with `engine` for `rounds` rounds (one global evaluation, at the end)."""
    import pyarrow.parquet as pq

    from raysim.config import validate_config
    from raysim.runner import run_experiment

    raw_cfg = cfg.to_yaml_dict()
    raw_cfg["resources"]["engine"] = engine
    raw_cfg["federation"]["rounds"] = rounds
    raw_cfg["eval"]["every"] = max(rounds, 1)
    ecfg = validate_config(raw_cfg)
    marks: list[float] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="raysim-bench-") as d:
        t0 = time.perf_counter()
        summary = run_experiment(ecfg, Path(d) / "run", address=address, verbose=verbose, progress=False,
                                 on_round=lambda row, ck: marks.append(time.perf_counter()))
        t_end = time.perf_counter()
        rows = pq.read_table(Path(d) / "run" / "rounds.parquet").to_pylist()
    times = [r["round_time_s"] for r in rows]
    round_time = steady_round_time(times)
    steps = ecfg.federation.clients_per_round * ecfg.train.local_steps
    out = {
        "engine": engine, "rounds": len(rows), "load_average_1m_before": round(load_before, 2), "round_time_s": round_time,
        "round_times_s": [round(x, 4) for x in times],
        "client_steps_per_round": steps,
        "client_steps_per_s": steps / round_time,
        "startup_s": marks[0] - t0 - times[0],
        "teardown_s": t_end - marks[-1],
        "total_s": t_end - t0,
        "clients_failed": sum(r["clients_failed"] for r in rows),
        "final_accuracy": rows[-1]["accuracy"],
        "gpus_per_worker": summary.get("gpus_per_worker"),
    }
    phases = startup_phases(summary)
    if phases is not None:
        out["startup_phases"] = phases
    return out
