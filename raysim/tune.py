"""`raysim sweep`: Ray Tune sweeps in which every trial is one full simulation.

A sweep file names a base run config (inline, or a path to a run YAML) and a search space over any
dotted config key:

```yaml
name: smoke
base: tiny.yaml                      # relative to this file; or an inline run config mapping
set: {federation.rounds: 3}          # optional overrides of the base (dotted keys)
search_space:
  aggregator.name: {grid_search: [fedit, fedex]}
  data.partition.alpha: {grid_search: [0.1, 100]}
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}          # also: choice, uniform, randint ([lo, hi), like Ray)
seeds: [0, 1]                        # every point runs once per seed (a grid over `seed`)
num_samples: 1                       # repeats of the grid (draws, for random distributions)
metric: accuracy                     # what ASHA and "best" look at; mode: max
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # grace period in rounds
max_concurrent_trials: 4
checkpoint_every: 1                  # rounds between trial checkpoints (0: a resumed trial restarts)
```

Everything is validated before Ray starts (ConfigError naming the key). Each trial runs
`raysim.runner.run_experiment` into `<sweep_dir>/trials/<trial>/` (the usual run directory); its
Coordinator and ClientWorkers are nested actors inside the trial's placement group, sized from the
trial's own config: `[{CPU: 1}] + [{CPU: cpus_per_worker, GPU: gpus_per_worker}] * num_workers`
(the Coordinator asks for no CPU and shares bundle 0 with the trial). Trials report every round with
`tune.report`; the Tune checkpoint records the round, the run directory holds raysim's own round
checkpoints, so `raysim sweep --resume DIR` continues unfinished trials from their last round and never
reruns finished ones. Outputs: `sweep.yaml` (self-contained copy), `trials.parquet`, `trials/`, `tune/`.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from raysim.config import ConfigError, apply_overrides, validate_config

SWEEP_KEYS = ("name", "description", "base", "set", "search_space", "seeds", "num_samples", "metric", "mode",
              "scheduler", "max_concurrent_trials", "checkpoint_every", "max_failures")
DISTRIBUTIONS = ("grid_search", "choice", "uniform", "loguniform", "randint")
# metrics a trial reports every round (and their natural direction)
METRICS = {"accuracy": "max", "best_accuracy": "max", "personalized_accuracy": "max", "loss": "min",
           "train_loss": "min", "deviation_rel": "min"}
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor", "max_t")
TUNE_DIR = "tune"            # Tune's experiment directory inside the sweep dir
TRIALS_DIR = "trials"        # one raysim run directory per trial
MAX_COMBOS_CHECKED = 5000    # grid combinations validated before Ray starts
MAX_DATA_CHECKS = 64         # distinct data/partition combinations loaded before Ray starts


# ----------------------------------------------------------------------------------------- the sweep spec


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]                      # run config as written (+ `set`), paths made absolute
    search_space: dict[str, dict[str, Any]]   # dotted key -> {distribution: args}
    seeds: list[int] | None = None
    num_samples: int = 1
    metric: str = "accuracy"
    mode: str = "max"
    scheduler: dict[str, Any] | None = None
    max_concurrent_trials: int | None = None
    checkpoint_every: int = 1
    max_failures: int = 1
    description: str = ""
    grid_values: dict[str, list] = field(default_factory=dict)   # grid/choice values (and seeds) by key

    @property
    def swept_keys(self) -> list[str]:
        return list(self.search_space) + (["seed"] if self.seeds else [])

    def num_trials(self) -> int:
        n = self.num_samples * (len(self.seeds) if self.seeds else 1)
        for spec in self.search_space.values():
            if "grid_search" in spec:
                n *= len(spec["grid_search"])
        return n

    def to_yaml_dict(self) -> dict[str, Any]:
        """A self-contained sweep file (base inline) — what `sweep.yaml` in the sweep dir holds."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["base"] = copy.deepcopy(self.base)
        out["search_space"] = copy.deepcopy(self.search_space)
        if self.seeds:
            out["seeds"] = list(self.seeds)
        out.update({"num_samples": self.num_samples, "metric": self.metric, "mode": self.mode,
                    "scheduler": copy.deepcopy(self.scheduler), "max_concurrent_trials": self.max_concurrent_trials,
                    "checkpoint_every": self.checkpoint_every, "max_failures": self.max_failures})
        return out


def load_sweep(path: str | Path, check_data: bool = True, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep file; relative `base:` paths are resolved against the file's folder.
    `overrides` ('a.b=c', as for `raysim run --set`) are applied to the base after the file's `set:`."""
    from raysim.config import parse_override

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if overrides and isinstance(raw, dict):
        extra = dict(raw.get("set") or {}) if isinstance(raw.get("set") or {}, dict) else raw.get("set")
        if isinstance(extra, dict):
            for item in overrides:
                parts, value = parse_override(item)
                extra[".".join(parts)] = value
            raw = {**raw, "set": extra}
    return parse_sweep(raw, base_dir=p.parent, default_name=p.stem, check_data=check_data)


def parse_sweep(raw: Any, base_dir: Path | None = None, default_name: str = "sweep",
                check_data: bool = True) -> SweepSpec:
    """Validate a sweep mapping completely (before any Ray work); raises ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError("the sweep file must be a YAML mapping with base: and search_space:")
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown sweep key; allowed: {', '.join(SWEEP_KEYS)}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"name: must be a non-empty string of letters, digits, '.', '_' or '-' (got {name!r})")

    base = _load_base(raw.get("base"), base_dir)
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("set: must be a mapping of dotted config keys to values, e.g. {federation.rounds: 3}")
    for key, value in overrides.items():
        base = _set_dotted(base, str(key), value, where=f"set.{key}")
    _validate(base, "base")
    base = _absolute_paths(base)

    seeds = _parse_seeds(raw.get("seeds"))
    search_space, grid_values = _parse_search_space(raw.get("search_space"), seeds)
    if seeds:
        grid_values["seed"] = list(seeds)
    num_samples = _int(raw.get("num_samples", 1), "num_samples", lo=1)
    metric = raw.get("metric", "accuracy")
    if metric not in METRICS:
        raise ConfigError(f"metric: unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    mode = raw.get("mode", METRICS[metric])
    if mode not in ("max", "min"):
        raise ConfigError(f"mode: must be max or min (got {mode!r})")
    max_conc = raw.get("max_concurrent_trials")
    if max_conc is not None:
        max_conc = _int(max_conc, "max_concurrent_trials", lo=1)
    spec = SweepSpec(
        name=name, base=base, search_space=search_space, seeds=seeds, num_samples=num_samples, metric=metric,
        mode=mode, scheduler=None, max_concurrent_trials=max_conc,
        checkpoint_every=_int(raw.get("checkpoint_every", 1), "checkpoint_every", lo=0),
        max_failures=_int(raw.get("max_failures", 1), "max_failures", lo=0),
        description=str(raw.get("description") or ""), grid_values=grid_values)
    _check_values(spec, check_data)
    spec.scheduler = _parse_scheduler(raw.get("scheduler"), spec)
    return spec


def _load_base(base: Any, base_dir: Path | None) -> dict[str, Any]:
    if base is None:
        raise ConfigError("base: missing; give a run config mapping or the path of a run YAML")
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a mapping or a path to a run YAML (got {type(base).__name__})")
    candidates = [Path(base)] if Path(base).is_absolute() else \
        [p for p in ((base_dir / base) if base_dir else None, Path(base)) if p is not None]
    for cand in candidates:
        if cand.is_file():
            try:
                loaded = yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"base: {cand} is not valid YAML ({exc})") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"base: {cand} must hold a YAML mapping")
            return loaded
    raise ConfigError(f"base: config file not found: {base} (looked in {', '.join(str(c) for c in candidates)})")


def _parse_seeds(seeds: Any) -> list[int] | None:
    if seeds is None:
        return None
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError("seeds: must be a non-empty list of integers, e.g. [0, 1, 2]")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds: must be integers (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: duplicate seeds in {seeds!r}")
    return list(seeds)


def _parse_search_space(space: Any, seeds: list[int] | None) -> tuple[dict[str, dict], dict[str, list]]:
    if space is None:
        space = {}
    if not isinstance(space, dict):
        raise ConfigError("search_space: must be a mapping of dotted config keys to {grid_search: [...]} etc.")
    if not space and not seeds:
        raise ConfigError("search_space: empty; name at least one dotted key to sweep (or give seeds:)")
    out: dict[str, dict] = {}
    grid_values: dict[str, list] = {}
    for key, spec in space.items():
        where = f"search_space.{key}"
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: keys are dotted config keys such as lora.rank")
        if key == "seed" and seeds:
            raise ConfigError("search_space.seed: seeds are given by seeds: already; use one or the other")
        if isinstance(spec, list):                       # shorthand: a bare list is a grid
            spec = {"grid_search": spec}
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)} "
                              f"(e.g. {{grid_search: [4, 8]}}); got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind in ("grid_search", "choice"):
            if not isinstance(args, list):
                raise ConfigError(f"{where}.{kind}: expected a list of values (got {args!r})")
            if not args:
                raise ConfigError(f"{where}.{kind}: empty grid; give at least one value")
            grid_values[key] = list(args)
        else:
            if (not isinstance(args, list) or len(args) != 2
                    or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in args)):
                raise ConfigError(f"{where}.{kind}: expected [low, high] numbers (got {args!r})")
            lo, hi = args
            if not lo < hi:
                raise ConfigError(f"{where}.{kind}: low must be < high (got [{lo}, {hi}])")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"{where}.loguniform: low must be > 0 (got {lo})")
            if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
                raise ConfigError(f"{where}.randint: low and high must be integers (got [{lo}, {hi}])")
        out[key] = {kind: copy.deepcopy(args)}
    return out, grid_values


def _parse_scheduler(sched: Any, spec: SweepSpec) -> dict[str, Any] | None:
    if sched is None or sched == "none" or sched is False:
        return None
    if sched == "asha":
        sched = {"name": "asha"}
    if not isinstance(sched, dict):
        raise ConfigError(f"scheduler: expected {{name: asha, grace_period: 1, reduction_factor: 2}} (got {sched!r})")
    unknown = [k for k in sched if k not in SCHEDULER_KEYS]
    if unknown:
        raise ConfigError(f"scheduler.{unknown[0]}: unknown key; allowed: {', '.join(SCHEDULER_KEYS)}")
    if sched.get("name", "asha") != "asha":
        raise ConfigError(f"scheduler.name: unknown scheduler {sched.get('name')!r}; allowed: asha")
    max_rounds = max(validate_config(raw).federation.rounds for raw in _representatives(spec))
    max_t = _int(sched.get("max_t", max_rounds), "scheduler.max_t", lo=1)
    grace = _int(sched.get("grace_period", 1), "scheduler.grace_period", lo=1)
    if grace > max_t:
        raise ConfigError(f"scheduler.grace_period: {grace} rounds exceeds the longest trial ({max_t} rounds)")
    rf = sched.get("reduction_factor", 2)
    if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 1:
        raise ConfigError(f"scheduler.reduction_factor: must be a number > 1 (got {rf!r})")
    return {"name": "asha", "grace_period": grace, "reduction_factor": rf, "max_t": max_t}


def _int(v: Any, key: str, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"{key}: must be an integer >= {lo} (got {v!r})")
    return v


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> dict[str, Any]:
    """A copy of `raw` with `a.b.c = value`, exactly as `--set a.b.c=value` would do it."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 30).strip()
    text = text.removesuffix("...").strip()              # the document-end marker safe_dump adds to scalars
    try:
        return apply_overrides(raw, [f"{key}={text}"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('--set ')}") from None


def _plain(v: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python scalars."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v


def _validate(raw: dict[str, Any], where: str):
    try:
        return validate_config(raw)
    except ConfigError as exc:
        msg = str(exc).removeprefix("invalid config:\n  ").replace("\n  ", "; ")
        raise ConfigError(f"{where}: {msg}") from None


def _absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Trials may run in another working directory: make file data sources and local model dirs absolute."""
    out = copy.deepcopy(raw)
    data = out.get("data")
    if isinstance(data, dict) and isinstance(data.get("source"), str):
        kind, sep, path = data["source"].partition(":")
        if sep and kind in ("parquet", "csv", "jsonl", "hf-disk") and path and not os.path.isabs(path):
            data["source"] = f"{kind}:{os.path.abspath(path)}"
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        name = model["name"]
        if ":" not in name and Path(name).is_dir():
            model["name"] = os.path.abspath(name)
    return out


def _representatives(spec: SweepSpec):
    """The base with each swept key set to each representative value, one key at a time."""
    for key, dist in spec.search_space.items():
        for value in _values_to_check(dist):
            yield _set_dotted(spec.base, key, value, where=f"search_space.{key}")
    if spec.seeds:
        for s in spec.seeds:
            yield _set_dotted(spec.base, "seed", s, where="seeds")
    if not spec.search_space and not spec.seeds:
        yield spec.base


def _values_to_check(dist: dict[str, Any]) -> list:
    kind, args = next(iter(dist.items()))
    if kind in ("grid_search", "choice"):
        return list(args)
    lo, hi = args
    if kind == "randint":
        return [lo, hi - 1]                         # Ray's randint excludes `high`
    return [lo, hi]


def _check_values(spec: SweepSpec, check_data: bool) -> None:
    """Every swept value alone, then every grid combination (up to a cap), then the data they imply."""
    for key, dist in spec.search_space.items():
        for value in _values_to_check(dist):
            raw = _set_dotted(spec.base, key, value, where=f"search_space.{key}")
            _validate(raw, f"search_space.{key}={value!r}")
    combos = _grid_combinations(spec, MAX_COMBOS_CHECKED)
    if len(spec.grid_values) > 1:
        for combo in combos:
            _validate(_apply(spec.base, combo), "search_space: the combination "
                      + ", ".join(f"{k}={v!r}" for k, v in combo.items()))
    if check_data:
        _check_data(spec, combos)


def _grid_combinations(spec: SweepSpec, cap: int) -> list[dict[str, Any]]:
    keys = list(spec.grid_values)
    out = []
    for values in itertools.product(*(spec.grid_values[k] for k in keys)):
        out.append(dict(zip(keys, values)))
        if len(out) >= cap:
            break
    return out


def _apply(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    raw = base
    for key, value in values.items():
        raw = _set_dotted(raw, key, value, where=f"search_space.{key}")
    return raw


def _check_data(spec: SweepSpec, combos: list[dict[str, Any]]) -> None:
    """Load and partition the data for each distinct data-shaping combination (missing files, more clients
    than samples, ...), so such mistakes stop the sweep here instead of erroring trials later."""
    from raysim.runner import prepare_data

    shaping = ("data.", "model.", "federation.num_clients", "seed")
    seen: set[str] = set()
    for combo in combos:
        part = {k: v for k, v in combo.items() if k.startswith(shaping) or k == "data"}
        tag = json.dumps(part, sort_keys=True, default=str)
        if tag in seen:
            continue
        seen.add(tag)
        if len(seen) > MAX_DATA_CHECKS:
            break
        what = ("search_space: " + ", ".join(f"{k}={v!r}" for k, v in part.items())) if part else "base"
        cfg = _validate(_apply(spec.base, part), what)
        try:
            prepare_data(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None


# ----------------------------------------------------------------------------------------- one trial


def trial_config(base: dict[str, Any], config: dict[str, Any], *, cluster_gpus: float = 0.0,
                 checkpoint_every: int = 1, name: str | None = None):
    """The ExperimentConfig a trial runs: base + the trial's sampled values, gpus 'auto' made concrete."""
    raw = _apply(base, {k: _plain(v) for k, v in config.items()})
    raw = copy.deepcopy(raw)
    raw.setdefault("output", {})["checkpoint_every"] = checkpoint_every
    if name is not None:
        raw["name"] = name
    res = raw.setdefault("resources", {})
    if res.get("gpus_per_worker", "auto") == "auto":
        workers = validate_config(raw).resources.num_workers
        res["gpus_per_worker"] = 0.0 if cluster_gpus <= 0 else min(1.0, cluster_gpus / workers)
    return validate_config(raw)


def trial_bundles(cfg) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the trainable (+ the zero-CPU Coordinator), then one per worker."""
    r = cfg.resources
    gpus = 0.0 if r.gpus_per_worker == "auto" else float(r.gpus_per_worker)
    worker = {k: v for k, v in (("CPU", float(r.cpus_per_worker)), ("GPU", gpus)) if v > 0}
    return [{"CPU": 1.0}] + ([worker] * r.num_workers if worker else [])


def make_resources(base: dict[str, Any], cluster_gpus: float, checkpoint_every: int):
    def resources(config: dict[str, Any]):
        from ray import tune

        cfg = trial_config(base, config, cluster_gpus=cluster_gpus, checkpoint_every=checkpoint_every)
        return tune.PlacementGroupFactory(trial_bundles(cfg))
    return resources


def make_trainable(base: dict[str, Any], trials_dir: Path, cluster_gpus: float, checkpoint_every: int,
                   sweep_name: str):
    """The Tune function trainable: one whole simulation, reporting once per round."""
    trials_dir = Path(trials_dir).resolve()

    def raysim_trial(config: dict[str, Any]) -> None:
        from ray import tune

        from raysim.runner import run_experiment

        trial_name = Path(tune.get_context().get_trial_dir()).name
        run_dir = trials_dir / trial_name
        cfg = trial_config(base, config, cluster_gpus=cluster_gpus, checkpoint_every=checkpoint_every,
                           name=f"{sweep_name}-{trial_name}")
        if (run_dir / "summary.json").is_file():
            # finished before an interruption hid it from Tune (the last report comes after summary.json):
            # nothing to redo, only the final report
            tracker = _MetricTracker(run_dir, up_to_round=cfg.federation.rounds)
            if tracker.last_row is not None:
                tune.report(tracker.final())
            return
        start_after = None                                      # the round a resumed trial continues after
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                done = int(json.loads((Path(d) / "state.json").read_text())["round"])
            start_after = _rewind(run_dir, done)
        resume = start_after is not None
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)          # a fresh start: no stale rows or checkpoints
        tracker = _MetricTracker(run_dir if resume else None, up_to_round=start_after or 0)
        last: dict[str, Any] = {}

        def report(metrics: dict[str, Any], checkpoint: bool) -> None:
            if not checkpoint:
                tune.report(metrics)
                return
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "state.json").write_text(json.dumps({"round": metrics["round"], "run_dir": str(run_dir)}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

        def on_round(row: dict[str, Any], ckpt_dir) -> None:
            metrics = tracker.update(row)
            if row["round"] >= cfg.federation.rounds:
                last["metrics"] = metrics     # reported once the adapter and summary.json are written: a
                return                        # scheduler stopping the trial at its last report loses nothing
            report(metrics, checkpoint=ckpt_dir is not None)

        run_experiment(cfg, run_dir, resume=resume, progress=False, on_round=on_round)
        if last:
            report(last["metrics"], checkpoint=True)

    return raysim_trial


def _rewind(run_dir: Path, done_round: int) -> int | None:
    """Align the run dir with Tune's checkpoint (round `done_round`): drop raysim checkpoints of later
    rounds so the resumed trial's rounds and Tune's training_iteration stay in step. Returns the round the
    run resumes after (its latest raysim checkpoint), or None when it cannot resume."""
    root = run_dir / "checkpoints"
    found = sorted(root.glob("round-*"))
    if not (run_dir / "config.yaml").is_file() or not found:
        return None
    if (root / f"round-{done_round:04d}").is_dir():
        for path in found:
            if int(path.name.split("-")[1]) > done_round:
                shutil.rmtree(path, ignore_errors=True)
        return done_round
    return int(found[-1].name.split("-")[1])


class _MetricTracker:
    """Per-round Tune metrics: accuracy carried forward between evaluations, best accuracy, byte totals."""

    def __init__(self, run_dir: Path | None, up_to_round: int = 0):
        self.best = float("nan")
        self.last_acc = float("nan")
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_row: dict[str, Any] | None = None
        path = run_dir / "rounds.parquet" if run_dir is not None else None
        if path is not None and path.exists():            # resumed: totals of the rounds already kept
            import pyarrow.parquet as pq

            for r in pq.read_table(path).to_pylist():
                if r["round"] <= up_to_round:
                    self._fold(r)
                    self.last_row = r

    def _fold(self, row: dict[str, Any]) -> None:
        acc = _num(row.get("accuracy"))
        if not math.isnan(acc):
            self.last_acc = acc
            self.best = acc if math.isnan(self.best) else max(self.best, acc)
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
                "round_time_s": _num(row.get("round_time_s"))}


def _num(v: Any) -> float:
    try:
        return float("nan") if v is None else float(v)
    except (TypeError, ValueError):
        return float("nan")


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
    def short(k: str) -> str:
        parts = k.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    names = {k: short(k) for k in keys}
    counts: dict[str, int] = {}
    for v in names.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: (v if counts[v] == 1 else k) for k, v in names.items()}


def _fmt(v: Any) -> str:
    v = _plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


# ----------------------------------------------------------------------------------------- the driver


class _Progress:
    """Driver-side view of the sweep: one line per finished trial; optional stop after N trials."""

    def __init__(self, total: int, trials_dir: Path, stop_after: int | None, quiet: bool):
        self.total = total
        self.trials_dir = trials_dir
        self.stop_after = stop_after
        self.quiet = quiet
        self.finished = 0
        self.stopping = False

    def trial_done(self, trial, error: bool) -> None:
        self.finished += 1
        name = Path(trial.path).name if getattr(trial, "path", None) else str(trial)
        if not self.quiet and not self.stopping:        # (trials Tune winds down after a stop are resumable)
            res = trial.last_result or {}
            run_dir = self.trials_dir / name
            status = "error" if error else ("completed" if (run_dir / "summary.json").exists()
                                            else f"stopped at round {res.get('round', '?')}")
            acc = res.get("accuracy")
            extra = f"  accuracy {acc:.4f}" if isinstance(acc, float) and not math.isnan(acc) else ""
            print(f"[sweep] {name}: {status}{extra}", flush=True)
        if self.stop_after is not None and self.finished >= self.stop_after and not self.stopping:
            self.stopping = True
            if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
                # Tune's own interrupt path (as for Ctrl+C): stop, save the experiment state, stay resumable
                os.kill(os.getpid(), signal.SIGUSR1)


_ACTIVE: _Progress | None = None     # the callback pickled into Tune's state delegates to the live driver


def _make_callback():
    from ray import tune

    class RaysimSweepCallback(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.trial_done(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.trial_done(trial, error=True)

    return RaysimSweepCallback()


def start_sweep_ray(address: str | None, need_cpus: float, num_cpus: int | None, verbose: bool) -> bool:
    """runner.start_ray: join Ray if initialised, else --address, else RAY_ADDRESS, else a private local
    instance — here with logical CPUs for the largest trial (or --num-cpus). True if this call started Ray."""
    from types import SimpleNamespace

    from raysim.runner import start_ray

    cpus = max(math.ceil(need_cpus), num_cpus or 0)
    # start_ray sizes a local instance as max(cores, num_workers × cpus_per_worker)
    return start_ray(address, SimpleNamespace(resources=SimpleNamespace(num_workers=cpus, cpus_per_worker=1)),
                     verbose)


def _check_cluster_fits(spec: SweepSpec, cluster_gpus: float, strict: bool) -> None:
    """Every enumerable trial's placement group must fit the cluster, else Tune would wait forever. On a
    Ray we started that is a ConfigError; on a joined cluster (which may autoscale) a warning."""
    import ray

    have = ray.cluster_resources()
    for combo in _grid_combinations(spec, MAX_COMBOS_CHECKED):
        cfg = trial_config(spec.base, combo, cluster_gpus=cluster_gpus)
        bundles = trial_bundles(cfg)
        r = cfg.resources
        problem = None
        for kind, what in (("GPU", f"{r.num_workers} workers × {r.gpus_per_worker:g} GPU"),
                           ("CPU", f"1 + {r.num_workers} workers × {r.cpus_per_worker:g} CPU")):
            need = sum(b.get(kind, 0.0) for b in bundles)
            if need > have.get(kind, 0.0) + 1e-9:
                problem = (f"resources: a trial needs {need:g} {kind}s ({what}) but the Ray cluster has "
                           f"{have.get(kind, 0.0):g}; lower resources.num_workers / cpus_per_worker / "
                           "gpus_per_worker (gpus_per_worker: auto adapts to the cluster)")
                break
        if problem and strict:
            raise ConfigError(problem)
        if problem:
            print(f"[sweep] warning: {problem} (waiting for the cluster to scale up)", file=sys.stderr)
            return


def _max_trial_cpus(spec: SweepSpec) -> float:
    best = 0.0
    for combo in _grid_combinations(spec, MAX_COMBOS_CHECKED):
        cfg = trial_config(spec.base, combo, cluster_gpus=0.0)
        best = max(best, sum(b.get("CPU", 0.0) for b in trial_bundles(cfg)))
    return best


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in spec.search_space.items():
        kind, args = next(iter(dist.items()))
        space[key] = {"grid_search": lambda a: tune.grid_search(list(a)), "choice": lambda a: tune.choice(list(a)),
                      "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                      "randint": lambda a: tune.randint(*a)}[kind](args)
    if spec.seeds:
        space["seed"] = tune.grid_search(list(spec.seeds))
    return space


def _quiet_tune_env() -> None:
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"                  # trials keep the driver's relative paths
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def run_sweep(spec: SweepSpec | None, sweep_dir: str | Path, *, resume: bool = False, address: str | None = None,
              num_cpus: int | None = None, stop_after_trials: int | None = None, verbose: bool = False,
              quiet: bool = False) -> "Any":
    """Run (or resume) a sweep into `sweep_dir`; writes sweep.yaml and trials.parquet. Returns the
    trials table (pandas). `spec` is read from sweep_dir/sweep.yaml when resuming."""
    global _ACTIVE
    sweep_dir = Path(sweep_dir).resolve()
    tune_path = sweep_dir / TUNE_DIR
    if resume:
        spec_file = sweep_dir / "sweep.yaml"
        if not spec_file.is_file() or not tune_path.is_dir():
            raise ConfigError(f"--resume: {sweep_dir} is not a raysim sweep directory (no sweep.yaml / {TUNE_DIR}/)")
        spec = load_sweep(spec_file, check_data=False)
    else:
        if spec is None:
            raise ConfigError("raysim sweep: give a sweep file (or --resume DIR)")
        if (sweep_dir / "sweep.yaml").exists() or tune_path.exists():
            raise ConfigError(f"--out: {sweep_dir} already holds a sweep; continue it with --resume {sweep_dir}")
    if stop_after_trials is not None and stop_after_trials < 1:
        raise ConfigError("--stop-after-trials: must be >= 1")

    _quiet_tune_env()
    import ray
    from ray import tune

    joins_cluster = not ray.is_initialized() and bool(address or os.environ.get("RAY_ADDRESS"))
    started = start_sweep_ray(address, _max_trial_cpus(spec), num_cpus, verbose)
    try:
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        _check_cluster_fits(spec, cluster_gpus, strict=not joins_cluster)   # a cluster may scale up
        sweep_dir.mkdir(parents=True, exist_ok=True)
        trials_dir = sweep_dir / TRIALS_DIR
        trials_dir.mkdir(exist_ok=True)
        if not resume:
            (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False))
        trainable = tune.with_resources(
            make_trainable(spec.base, trials_dir, cluster_gpus, spec.checkpoint_every, spec.name),
            resources=make_resources(spec.base, cluster_gpus, spec.checkpoint_every))
        _ACTIVE = _Progress(spec.num_trials(), trials_dir, stop_after_trials, quiet)
        if resume:
            if not tune.Tuner.can_restore(str(tune_path)):
                raise ConfigError(f"--resume: Tune has no saved experiment state in {tune_path}")
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=_param_space(spec), tune_config=_tune_config(spec),
                               run_config=tune.RunConfig(
                                   name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0,
                                   callbacks=[_make_callback()],
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                   failure_config=tune.FailureConfig(max_failures=spec.max_failures)))
        if not quiet:
            print(f"[sweep] {spec.name}: {spec.num_trials()} trials -> {sweep_dir}", flush=True)
        with _quiet_tune_logs(verbose), _own_signal_handlers():
            tuner.fit()
        table = trials_table(spec, tune_path, trials_dir)
        write_trials(table, sweep_dir)
        if not quiet:
            _print_summary(table, sweep_dir)
        return table
    finally:
        _ACTIVE = None
        if started:
            ray.shutdown()


def _tune_config(spec: SweepSpec):
    from ray import tune

    scheduler = None
    if spec.scheduler:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", max_t=spec.scheduler["max_t"],
            grace_period=spec.scheduler["grace_period"], reduction_factor=spec.scheduler["reduction_factor"])
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
                           max_concurrent_trials=spec.max_concurrent_trials, trial_dirname_creator=trial_dirname)


class _own_signal_handlers:
    """Tune installs SIGINT/SIGUSR1 handlers for its run and leaves them behind; put ours back afterwards."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self.saved[sig] = signal.getsignal(sig)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False


class _quiet_tune_logs:
    """Tune logs warnings (interrupts, incomplete trials) that raysim reports itself, more briefly."""

    def __init__(self, verbose: bool):
        self.verbose = verbose

    def __enter__(self):
        import logging

        self.saved = {}
        if not self.verbose:
            for name in ("ray.tune", "ray.train", "ray.air"):
                logger = logging.getLogger(name)
                self.saved[name] = logger.level
                logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        import logging

        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)
        return False


# ----------------------------------------------------------------------------------------- trials.parquet

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
    rows = []
    for result in ResultGrid(analysis):
        name = Path(result.path).name
        config = result.config or {}
        cfg_seed = _plain(config["seed"]) if "seed" in config else spec.base.get("seed", 0)
        row: dict[str, Any] = {"trial": name, "trial_id": (result.metrics or {}).get("trial_id")}
        for key in spec.search_space:
            value = _plain(config.get(key))
            row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        row["seed"] = int(cfg_seed)
        row.update(run_dir_metrics(trials_dir / name))
        tune_status = statuses.get(str(result.path), "")
        if result.error is not None or tune_status == "ERROR":
            row["status"] = "error"
            text = str(result.error or "").strip()
            row["error"] = text.splitlines()[-1][:500] if text else "error (see the trial's Tune directory)"
        elif row["status"] != "completed":
            # TERMINATED without finishing = stopped early by the scheduler (ASHA); otherwise it resumes
            row["status"] = ("stopped" if tune_status == "TERMINATED"
                             else "unfinished" if row["rounds_done"] else "pending")
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("trial", kind="stable").reset_index(drop=True)
    return df


def run_dir_metrics(run_dir: Path) -> dict[str, Any]:
    """Final metrics of one run directory (complete or not) from rounds.parquet and summary.json."""
    import pyarrow.parquet as pq

    out: dict[str, Any] = {k: None for k in RESULT_COLUMNS}
    out.update({"status": "pending", "rounds_done": 0, "run_dir": str(run_dir)})
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        try:
            out["rounds"] = int(yaml.safe_load(cfg_file.read_text())["federation"]["rounds"])
        except Exception:  # noqa: BLE001 - a half-written config must not break the table
            pass
    path = run_dir / "rounds.parquet"
    if path.exists():
        rows = pq.read_table(path).to_pylist()
        if rows:
            last = rows[-1]
            accs = [(r["accuracy"], r["round"]) for r in rows if r.get("accuracy") is not None
                    and not math.isnan(r["accuracy"])]
            devs = [r["deviation_rel"] for r in rows if r.get("deviation_rel") is not None]
            out.update({
                "status": "unfinished", "rounds_done": int(last["round"]),
                "accuracy": accs[-1][0] if accs else None, "loss": last.get("loss"),
                "deviation_rel": last.get("deviation_rel"), "max_deviation_rel": max(devs) if devs else None,
                "best_accuracy": max(accs)[0] if accs else None, "best_round": max(accs)[1] if accs else None,
                "personalized_accuracy": last.get("personalized_accuracy"), "train_loss": last.get("train_loss"),
                "bytes_up": int(sum(r["bytes_up"] or 0 for r in rows)),
                "bytes_down": int(sum(r["bytes_down"] or 0 for r in rows)), "wall_s": last.get("wall_s")})
    if (run_dir / "summary.json").is_file():
        out["status"] = "completed"
    return out


def write_trials(table, sweep_dir: Path) -> Path:
    path = Path(sweep_dir) / "trials.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def _print_summary(table, sweep_dir: Path) -> None:
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    print(f"[sweep] {len(table)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)
    if any(s in counts for s in ("unfinished", "pending")):
        print(f"[sweep] not finished; continue with: raysim sweep --resume {sweep_dir}", flush=True)
    print(f"[sweep] trials table: {sweep_dir / 'trials.parquet'}  (raysim report {sweep_dir})", flush=True)


# ----------------------------------------------------------------------------------------- CLI


def default_sweep_dir(spec: SweepSpec) -> Path:
    return Path("runs") / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def cmd_sweep(args) -> int:
    if args.resume:
        if args.file or args.set:
            raise ConfigError("raysim sweep: --resume DIR continues the sweep as it was; give no FILE or --set")
        spec, sweep_dir = None, Path(args.resume)
    else:
        if not args.file:
            raise ConfigError("raysim sweep: give a sweep file (or --resume DIR)")
        spec = load_sweep(args.file, overrides=args.set)   # every config/data mistake surfaces here
        sweep_dir = Path(args.out) if args.out else default_sweep_dir(spec)
    t0 = time.time()
    table = run_sweep(spec, sweep_dir, resume=bool(args.resume), address=args.address, num_cpus=args.num_cpus,
                      stop_after_trials=args.stop_after_trials, verbose=args.verbose)
    print(f"[sweep] done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 1 if len(table) and (table["status"] == "error").any() else 0


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser("sweep", help="run a Ray Tune sweep of simulations (resumable)")
    p.add_argument("file", nargs="?", help="sweep YAML (base: + search_space:)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted sweep; finished trials are kept")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default runs/<name>-<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base run config (dotted; value parsed as YAML); repeatable")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray instance (default: enough for the largest trial)")
    p.add_argument("--stop-after-trials", type=int, default=None, metavar="N",
                   help="stop (resumably) once N trials have finished in this invocation")
    add_common(p)
    p.set_defaults(func=cmd_sweep)
