"""trials.parquet: one row per trial with its swept values, final metrics and status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from raysim.tune.spec import DEFAULT_SEED, SweepSpec, plain

RESULT_COLUMNS = ["status", "rounds_done", "rounds", "accuracy", "loss", "deviation_rel", "max_deviation_rel",
                  "best_accuracy", "best_round", "personalized_accuracy", "train_loss", "bytes_up", "bytes_down",
                  "wall_s", "run_dir", "error"]


def trials_table(spec: SweepSpec, tune_path: Path, trials_dir: Path):
    """One row per trial Tune knows of: trial name and id, swept values (dotted-key columns), seed, final
    metrics and status. Read from the experiment state Tune saved on disk — what a resume would see (after
    an interrupt Tune's in-memory trials are all marked terminated, the saved state is not)."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis, ResultGrid

    analysis = ExperimentAnalysis(str(tune_path), default_metric=spec.metric, default_mode=spec.mode)
    statuses = {str(t.path): str(t.status) for t in analysis.trials}
    rows = [_trial_row(spec, result, statuses.get(str(result.path), ""), trials_dir)
            for result in ResultGrid(analysis)]
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("trial", kind="stable").reset_index(drop=True)
    return df


def _trial_row(spec: SweepSpec, result, tune_status: str, trials_dir: Path) -> dict[str, Any]:
    """The row of one Tune result: its swept values, then the metrics of its run directory."""
    name = Path(result.path).name
    config = result.config or {}
    row: dict[str, Any] = {"trial": name, "trial_id": (result.metrics or {}).get("trial_id")}
    for key in spec.search_space:
        value = plain(config.get(key))
        row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    row["seed"] = int(plain(config["seed"]) if "seed" in config else spec.base.get("seed", DEFAULT_SEED))
    row.update(run_dir_metrics(trials_dir / name))
    if result.error is not None or tune_status == "ERROR":
        row["status"] = "error"
        text = str(result.error or "").strip()
        row["error"] = text.splitlines()[-1][:500] if text else "error (see the trial's Tune directory)"
    elif row["status"] != "completed":
        # TERMINATED without finishing = stopped early by the scheduler (ASHA); otherwise it resumes
        row["status"] = ("stopped" if tune_status == "TERMINATED"
                         else "unfinished" if row["rounds_done"] else "pending")
    return row


def run_dir_metrics(run_dir: Path) -> dict[str, Any]:
    """Final metrics of one run directory (complete or not) from rounds.parquet and summary.json."""
    import pyarrow.parquet as pq

    out: dict[str, Any] = {k: None for k in RESULT_COLUMNS}
    out.update({"status": "pending", "rounds_done": 0, "run_dir": str(run_dir), "rounds": _planned_rounds(run_dir)})
    path = run_dir / "rounds.parquet"
    rows = pq.read_table(path).to_pylist() if path.exists() else []
    if rows:
        out.update(_rounds_metrics(rows))
    if (run_dir / "summary.json").is_file():
        out["status"] = "completed"
    return out


def _planned_rounds(run_dir: Path) -> int | None:
    """federation.rounds of the run's config.yaml; None while there is none (or it is half-written)."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        return int(yaml.safe_load(cfg_file.read_text())["federation"]["rounds"])
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
        "bytes_up": s["totals"]["bytes_up"], "bytes_down": s["totals"]["bytes_down"], "wall_s": s["wall_s"]}


def write_trials(table, sweep_dir: Path) -> Path:
    """Write trials.parquet atomically (a reader never sees half a table)."""
    path = Path(sweep_dir) / "trials.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def print_summary(table, sweep_dir: Path) -> None:
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    print(f"[sweep] {len(table)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if any(s in counts for s in ("unfinished", "pending")):
        print(f"[sweep] not finished; continue with: raysim sweep --resume {sweep_dir}", flush=True)
    print(f"[sweep] trials table: {sweep_dir / 'trials.parquet'}  (raysim report {sweep_dir})", flush=True)
