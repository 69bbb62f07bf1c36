"""trials.parquet: one row per trial with its swept values, final metrics and status. The sweep directory
is a local path or a filesystem URI; everything is read and written through `raysim.storage.RunStorage`."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

import yaml

from raysim.storage import RunStorage
from raysim.tune.spec import DEFAULT_SEED, SweepSpec, plain

TUNE_DIR = "tune"            # Tune's experiment directory inside the sweep dir
TRIALS_DIR = "trials"        # one raysim run directory per trial

RESULT_COLUMNS = ["status", "rounds_done", "rounds", "accuracy", "loss", "deviation_rel", "max_deviation_rel",
                  "best_accuracy", "best_round", "personalized_accuracy", "train_loss", "bytes_up", "bytes_down",
                  "wall_s", "run_dir", "error",
                  # added after the columns above (whose order stays): last evaluated values of more metrics
                  "exact_match", "perplexity", "personalized_accuracy_mean", "personalized_accuracy_p10"]

# rounds.parquet columns whose last evaluated (non-null) value is a trials.parquet column of the same name
LAST_EVALUATED = ("exact_match", "perplexity", "personalized_accuracy_mean", "personalized_accuracy_p10")


def trials_table(spec: SweepSpec, sweep_dir: "RunStorage | str | os.PathLike"):
    """One row per trial Tune knows of: trial name and id, swept values (dotted-key columns), seed, final
    metrics and status. Read from the experiment state Tune saved in the sweep's storage — what a resume
    would see (after an interrupt Tune's in-memory trials are all marked terminated, the saved state is not)."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis, ResultGrid

    sweep = RunStorage.of(sweep_dir)
    analysis = ExperimentAnalysis(sweep.path(TUNE_DIR), storage_filesystem=sweep.fs, default_metric=spec.metric,
                                  default_mode=spec.mode)
    statuses = {str(t.path): str(t.status) for t in analysis.trials}
    trials = sweep.child(TRIALS_DIR)
    rows = [_trial_row(spec, result, statuses.get(str(result.path), ""), trials)
            for result in ResultGrid(analysis)]
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("trial", kind="stable").reset_index(drop=True)
    return df


def _trial_row(spec: SweepSpec, result, tune_status: str, trials: RunStorage) -> dict[str, Any]:
    """The row of one Tune result: its swept values, then the metrics of its run directory."""
    name = str(result.path).rstrip("/").rsplit("/", 1)[-1]
    config = result.config or {}
    row: dict[str, Any] = {"trial": name, "trial_id": (result.metrics or {}).get("trial_id")}
    for key in spec.search_space:
        value = plain(config.get(key))
        row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    row["seed"] = int(plain(config["seed"]) if "seed" in config else spec.base.get("seed", DEFAULT_SEED))
    row.update(run_dir_metrics(trials.child(name)))
    if result.error is not None or tune_status == "ERROR":
        row["status"] = "error"
        text = str(result.error or "").strip()
        row["error"] = text.splitlines()[-1][:500] if text else "error (see the trial's Tune directory)"
    elif row["status"] != "completed":
        # TERMINATED without finishing = stopped early by the scheduler (ASHA); otherwise it resumes
        row["status"] = ("stopped" if tune_status == "TERMINATED"
                         else "unfinished" if row["rounds_done"] else "pending")
    return row


def run_dir_metrics(run_dir: "RunStorage | str | os.PathLike") -> dict[str, Any]:
    """Final metrics of one run directory (complete or not) from rounds.parquet and summary.json."""
    from raysim.metrics import read_rounds

    run = RunStorage.of(run_dir)
    out: dict[str, Any] = {k: None for k in RESULT_COLUMNS}
    out.update({"status": "pending", "rounds_done": 0, "run_dir": run.uri(), "rounds": _planned_rounds(run)})
    rows = read_rounds(run)
    if rows:
        out.update(_rounds_metrics(rows))
    if run.is_file("summary.json"):
        out["status"] = "completed"
    return out


def _planned_rounds(run: RunStorage) -> int | None:
    """federation.rounds of the run's config.yaml; None while there is none (or it is half-written)."""
    if not run.is_file("config.yaml"):
        return None
    try:
        return int(yaml.safe_load(run.read_text("config.yaml"))["federation"]["rounds"])
    except Exception:  # noqa: BLE001 - a half-written config must not break the table
        return None


def _rounds_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The final and best metrics and byte totals of the rows of rounds.parquet (not empty)."""
    from raysim.metrics import summarise_rounds

    s, last = summarise_rounds(rows), rows[-1]
    return {
        "status": "unfinished", "rounds_done": int(last["round"]),
        "accuracy": s["last_evaluated"]["accuracy"], "loss": last.get("loss"),
        "deviation_rel": last.get("deviation_rel"), "max_deviation_rel": s["max_deviation_rel"],
        "best_accuracy": s["best"]["accuracy"], "best_round": s["best"]["round"],
        "personalized_accuracy": last.get("personalized_accuracy"), "train_loss": last.get("train_loss"),
        "bytes_up": s["totals"]["bytes_up"], "bytes_down": s["totals"]["bytes_down"], "wall_s": s["wall_s"],
        **{k: _last_evaluated(rows, k) for k in LAST_EVALUATED}}


def _last_evaluated(rows: list[dict[str, Any]], key: str) -> Any:
    """The value of `key` in the last row where it is set (rounds without an evaluation leave it null)."""
    values = [r.get(key) for r in rows if r.get(key) is not None and r.get(key) == r.get(key)]
    return values[-1] if values else None


def write_trials(table, sweep_dir: "RunStorage | str | os.PathLike") -> str:
    """Write trials.parquet atomically (a reader never sees half a table); returns its location."""
    import pyarrow as pa

    sweep = RunStorage.of(sweep_dir)
    sweep.write_parquet("trials.parquet", pa.Table.from_pandas(table, preserve_index=False))
    return sweep.uri("trials.parquet")


def print_summary(table, sweep_dir: "RunStorage | str | os.PathLike") -> None:
    sweep = RunStorage.of(sweep_dir)
    where = shlex.quote(sweep.uri())                         # a URI's options hold '?' and '&'
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    print(f"[sweep] {len(table)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if any(s in counts for s in ("unfinished", "pending")):
        print(f"[sweep] not finished; continue with: raysim sweep --resume {where}", flush=True)
    print(f"[sweep] trials table: {sweep.uri('trials.parquet')}  (raysim report {where})", flush=True)
