"""What runs inside one Tune trial: a whole simulation, reported to Tune once per round.

A trial runs `raysim.runner.run_experiment` into `<sweep_dir>/trials/<trial>/` (the usual run directory,
on local disk or in the sweep's object store: every file goes through `raysim.storage.RunStorage`).
Its Coordinator and ClientWorkers are nested actors inside the trial's placement group, sized from the
trial's own config: `[{CPU: 1}] + [{CPU: cpus_per_worker, GPU: gpus_per_worker}] * num_workers` (the
Coordinator asks for no CPU and shares bundle 0 with the trial). The Tune checkpoint records only the
round; the run directory holds raysim's own round checkpoints, from which a resumed trial continues.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from raysim.checkpoint import checkpoint_rounds, drop_checkpoints_after
from raysim.config import ExperimentConfig, validate_config
from raysim.metrics import read_rounds
from raysim.storage import RunStorage
from raysim.tune.spec import DEFAULT_CHECKPOINT_EVERY, apply_values, plain


def trial_config(base: dict[str, Any], config: dict[str, Any], *, cluster_gpus: float = 0.0,
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, name: str | None = None) -> ExperimentConfig:
    """The ExperimentConfig a trial runs: base + the trial's sampled values, gpus 'auto' made concrete."""
    raw = copy.deepcopy(apply_values(base, {k: plain(v) for k, v in config.items()}))
    raw.setdefault("output", {})["checkpoint_every"] = checkpoint_every
    if name is not None:
        raw["name"] = name
    cfg = validate_config(raw)
    if cfg.resources.gpus_per_worker == "auto":     # the visible GPUs split over the workers, at most 1 each
        gpus = 0.0 if cluster_gpus <= 0 else min(1.0, cluster_gpus / cfg.resources.num_workers)
        raw.setdefault("resources", {})["gpus_per_worker"] = gpus
        cfg = validate_config(raw)
    return cfg


def trial_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the trainable (+ the zero-CPU Coordinator), then one per worker."""
    r = cfg.resources
    gpus = 0.0 if r.gpus_per_worker == "auto" else float(r.gpus_per_worker)
    worker = {k: v for k, v in (("CPU", float(r.cpus_per_worker)), ("GPU", gpus)) if v > 0}
    return [{"CPU": 1.0}] + ([worker] * r.num_workers if worker else [])


def make_resources(base: dict[str, Any], cluster_gpus: float, checkpoint_every: int):
    """Tune's per-trial resource request: the placement group of the trial's own config."""
    def resources(config: dict[str, Any]):
        from ray import tune

        cfg = trial_config(base, config, cluster_gpus=cluster_gpus, checkpoint_every=checkpoint_every)
        return tune.PlacementGroupFactory(trial_bundles(cfg))
    return resources


def make_trainable(base: dict[str, Any], trials: "RunStorage | str | Path", cluster_gpus: float,
                   checkpoint_every: int, sweep_name: str):
    """The Tune function trainable: one whole simulation, reporting once per round. `trials` is the sweep's
    trials/ folder (a local path, a URI or a RunStorage); each trial writes its own run directory in it."""
    trials = RunStorage.of(trials)
    # the driver already accepted a node-local sweep directory on a shared filesystem: so do the trials
    shared_out = os.environ.get("RAYSIM_SHARED_OUT")

    def raysim_trial(config: dict[str, Any]) -> None:
        from ray import tune

        if shared_out:
            os.environ["RAYSIM_SHARED_OUT"] = shared_out
        trial_name = Path(tune.get_context().get_trial_dir()).name
        cfg = trial_config(base, config, cluster_gpus=cluster_gpus, checkpoint_every=checkpoint_every,
                           name=f"{sweep_name}-{trial_name}")
        run_trial(cfg, trials.child(trial_name))

    return raysim_trial


def run_trial(cfg: ExperimentConfig, run_dir: "RunStorage | str | Path") -> None:
    """Run (or resume, from Tune's checkpoint) one trial's simulation into `run_dir` (path, URI or storage)."""
    from ray import tune

    from raysim.runner import run_experiment

    run = RunStorage.of(run_dir)
    if run.is_file("summary.json"):
        # finished before an interruption hid it from Tune (the last report comes after summary.json):
        # nothing to redo, only the final report
        tracker = MetricTracker(run, up_to_round=cfg.federation.rounds)
        if tracker.last_row is not None:
            tune.report(tracker.final())
        return
    start_after = _resume_point(run)                      # the round a resumed trial continues after
    if start_after is None:
        run.delete_dir("")                                # a fresh start: no stale rows or checkpoints
    reporter = _RoundReporter(run, cfg.federation.rounds, start_after)
    run_experiment(cfg, run.uri(), resume=start_after is not None, progress=False, on_round=reporter.on_round)
    reporter.finish()


def _resume_point(run: RunStorage) -> int | None:
    """The round to continue after, from Tune's checkpoint of this trial (None: start afresh)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        done = int(json.loads((Path(d) / "state.json").read_text())["round"])
    return rewind_to_checkpoint(run, done)


def rewind_to_checkpoint(run_dir: "RunStorage | str | Path", done_round: int) -> int | None:
    """Align the run dir with Tune's checkpoint (round `done_round`): drop raysim checkpoints of later
    rounds so the resumed trial's rounds and Tune's training_iteration stay in step. Returns the round the
    run resumes after (its latest raysim checkpoint), or None when it cannot resume."""
    run = RunStorage.of(run_dir)
    rounds = [rnd for rnd, _ in checkpoint_rounds(run)]          # in round order, not name order
    if not run.is_file("config.yaml") or not rounds:
        return None
    if done_round in rounds:
        drop_checkpoints_after(run, done_round)
        return done_round
    return rounds[-1]


class _RoundReporter:
    """run_experiment's on_round callback: reports each round's metrics to Tune, with a Tune checkpoint
    whenever raysim wrote one. The last round is reported by finish(), once the adapter and summary.json
    are written, so a scheduler stopping the trial at its last report loses nothing."""

    def __init__(self, run_dir: RunStorage, rounds: int, start_after: int | None):
        self.run_dir = run_dir
        self.rounds = rounds
        self.tracker = MetricTracker(run_dir if start_after is not None else None, up_to_round=start_after or 0)
        self.last: dict[str, Any] | None = None

    def on_round(self, row: dict[str, Any], ckpt_dir) -> None:
        metrics = self.tracker.update(row)
        if row["round"] >= self.rounds:
            self.last = metrics
            return
        self._report(metrics, checkpoint=ckpt_dir is not None)

    def finish(self) -> None:
        if self.last is not None:
            self._report(self.last, checkpoint=True)

    def _report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        from ray import tune

        if not checkpoint:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            state = {"round": metrics["round"], "run_dir": self.run_dir.uri()}
            (Path(d) / "state.json").write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


# evaluation metrics of the task types, carried forward between evaluations like accuracy
TASK_METRICS = ("exact_match", "perplexity", "macro_f1", "mcc", "pearson", "spearman")


class MetricTracker:
    """Per-round Tune metrics: accuracy (and the task's other evaluation metrics) carried forward between
    evaluations, best accuracy, byte totals."""

    def __init__(self, run_dir: "RunStorage | str | Path | None", up_to_round: int = 0):
        self.best = float("nan")
        self.last_acc = float("nan")
        self.last_eval = dict.fromkeys(TASK_METRICS, float("nan"))
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_row: dict[str, Any] | None = None
        for r in read_rounds(run_dir) if run_dir is not None else []:    # resumed: the rounds already kept
            if r["round"] <= up_to_round:
                self._fold(r)
                self.last_row = r

    def _fold(self, row: dict[str, Any]) -> None:
        acc = _num(row.get("accuracy"))
        if not math.isnan(acc):
            self.last_acc = acc
            self.best = acc if math.isnan(self.best) else max(self.best, acc)
        for key in TASK_METRICS:
            if not math.isnan(_num(row.get(key))):
                self.last_eval[key] = _num(row.get(key))
        self.bytes_up += int(row.get("bytes_up") or 0)
        self.bytes_down += int(row.get("bytes_down") or 0)

    def final(self) -> dict[str, Any]:
        """The metrics of the last round already folded in."""
        return self._metrics(self.last_row)

    def update(self, row: dict[str, Any]) -> dict[str, Any]:
        self._fold(row)
        return self._metrics(row)

    def _metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"round": int(row["round"]), "accuracy": self.last_acc, "best_accuracy": self.best,
                "loss": _num(row.get("loss")), "train_loss": _num(row.get("train_loss")),
                "deviation_rel": _num(row.get("deviation_rel")),
                "personalized_accuracy": _num(row.get("personalized_accuracy")),
                "bytes_up_total": self.bytes_up, "bytes_down_total": self.bytes_down,
                "clients_completed": int(row.get("clients_completed") or 0),
                "clients_failed": int(row.get("clients_failed") or 0),
                "round_time_s": _num(row.get("round_time_s")), **self.last_eval}


def _num(v: Any) -> float:
    try:
        return float("nan") if v is None else float(v)
    except (TypeError, ValueError):
        return float("nan")


# ----------------------------------------------------------------------------------------- trial names


def trial_dirname(trial) -> str:
    """Readable, unique trial directory names: `0003_aggregator=fedex_alpha=0.1_seed=1`."""
    try:
        index = int(str(trial.trial_id).rsplit("_", 1)[-1])
    except ValueError:
        index = 0
    return trial_label(index, trial.config)


def trial_label(index: int, config: dict[str, Any]) -> str:
    shorts = _short_names(list(config))
    parts = [f"{index:04d}"] + [f"{shorts[k]}={_fmt(config[k])}" for k in config]
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts))
    return name[:120]


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (`aggregator.name` -> `aggregator`), the full key where ambiguous."""
    def short(k: str) -> str:
        parts = k.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    names = {k: short(k) for k in keys}
    counts: dict[str, int] = {}
    for v in names.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: (v if counts[v] == 1 else k) for k, v in names.items()}


def _fmt(v: Any) -> str:
    v = plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):             # a whole section: `lora_fair,lam=0.01` (its name first, then its keys)
        head = [_fmt(v["name"])] if "name" in v else []
        return ",".join(head + [f"{k}={_fmt(x)}" for k, x in v.items() if k != "name"])
    if isinstance(v, list):
        return ",".join(_fmt(x) for x in v)
    return str(v)
