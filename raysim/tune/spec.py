"""The sweep file: its schema, the search space, and every check that runs before Ray starts.

Validation is complete here: each swept value alone, every grid combination (up to a cap), and the data
each distinct data-shaping combination implies. Mistakes are ConfigErrors naming the sweep key.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysim.config import (ConfigError, ExperimentConfig, OutputConfig, apply_overrides, parse_override,
                           read_yaml_file, validate_config)

SWEEP_KEYS = ("name", "description", "base", "set", "search_space", "seeds", "num_samples", "metric", "mode",
              "scheduler", "max_concurrent_trials", "checkpoint_every", "max_failures")
DISTRIBUTIONS = ("grid_search", "choice", "uniform", "loguniform", "randint")
# metrics a trial reports every round (and their natural direction)
METRICS = {"accuracy": "max", "best_accuracy": "max", "personalized_accuracy": "max", "loss": "min",
           "train_loss": "min", "deviation_rel": "min", "exact_match": "max", "perplexity": "min",
           "macro_f1": "max", "mcc": "max", "pearson": "max", "spearman": "max"}
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor", "max_t")
MAX_COMBOS_CHECKED = 5000    # grid combinations validated before Ray starts
MAX_DATA_CHECKS = 64         # distinct data/partition combinations loaded before Ray starts
# the sweep's checkpoint_every becomes each trial's output.checkpoint_every: same default
DEFAULT_CHECKPOINT_EVERY: int = OutputConfig.model_fields["checkpoint_every"].default
DEFAULT_SEED: int = ExperimentConfig.model_fields["seed"].default
FILE_SOURCES = ("parquet", "csv", "jsonl", "hf-disk")   # data.source kinds that name a local path


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]                      # run config as written (+ `set`), paths made absolute
    search_space: dict[str, dict[str, Any]]   # dotted key -> {distribution: args}
    seeds: list[int] | None
    num_samples: int
    metric: str
    mode: str
    max_concurrent_trials: int | None
    checkpoint_every: int
    max_failures: int
    description: str
    scheduler: dict[str, Any] | None = None
    grid_values: dict[str, list] = field(default_factory=dict)   # grid/choice values (and seeds) by key

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
    p = Path(path)
    raw = read_yaml_file(p, "sweep file")
    if overrides and isinstance(raw, dict) and isinstance(raw.get("set") or {}, dict):
        extra = dict(raw.get("set") or {})
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
    base = _parse_base(raw, base_dir)
    seeds = _parse_seeds(raw.get("seeds"))
    search_space, grid_values = _parse_search_space(raw.get("search_space"), seeds)
    if seeds:
        grid_values["seed"] = list(seeds)
    spec = SweepSpec(name=name, base=base, search_space=search_space, seeds=seeds,
                     description=str(raw.get("description") or ""), grid_values=grid_values,
                     **_parse_run_options(raw))
    _check_values(spec, check_data)
    spec.scheduler = _parse_scheduler(raw.get("scheduler"), spec)
    return spec


def _parse_base(raw: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """The base run config with the sweep's `set:` applied, validated, local paths made absolute."""
    base = _load_base(raw.get("base"), base_dir)
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("set: must be a mapping of dotted config keys to values, e.g. {federation.rounds: 3}")
    for key, value in overrides.items():
        base = set_dotted(base, str(key), value, where=f"set.{key}")
    _validate(base, "base")
    return _absolute_paths(base)


def _parse_run_options(raw: dict[str, Any]) -> dict[str, Any]:
    """num_samples, metric/mode, concurrency, checkpointing and retries, with their defaults."""
    metric = raw.get("metric", "accuracy")
    if metric not in METRICS:
        raise ConfigError(f"metric: unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    mode = raw.get("mode", METRICS[metric])
    if mode not in ("max", "min"):
        raise ConfigError(f"mode: must be max or min (got {mode!r})")
    max_conc = raw.get("max_concurrent_trials")
    return {
        "num_samples": _int(raw.get("num_samples", 1), "num_samples", lo=1), "metric": metric, "mode": mode,
        "max_concurrent_trials": None if max_conc is None else _int(max_conc, "max_concurrent_trials", lo=1),
        "checkpoint_every": _int(raw.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY), "checkpoint_every", lo=0),
        "max_failures": _int(raw.get("max_failures", 1), "max_failures", lo=0)}


def _load_base(base: Any, base_dir: Path | None) -> dict[str, Any]:
    if base is None:
        raise ConfigError("base: missing; give a run config mapping or the path of a run YAML")
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a mapping or a path to a run YAML (got {type(base).__name__})")
    if Path(base).is_absolute() or base_dir is None:
        candidates = [Path(base)]
    else:
        candidates = [base_dir / base, Path(base)]
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
    """The search space as {key: {distribution: args}}, and the values of its grid/choice keys."""
    if space is None:
        space = {}
    if not isinstance(space, dict):
        raise ConfigError("search_space: must be a mapping of dotted config keys to {grid_search: [...]} etc.")
    if not space and not seeds:
        raise ConfigError("search_space: empty; name at least one dotted key to sweep (or give seeds:)")
    out: dict[str, dict] = {}
    grid_values: dict[str, list] = {}
    for key, dist in space.items():
        where = f"search_space.{key}"
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: keys are dotted config keys such as lora.rank")
        if key == "seed" and seeds:
            raise ConfigError("search_space.seed: seeds are given by seeds: already; use one or the other")
        kind, args = _parse_distribution(dist, where)
        if kind in ("grid_search", "choice"):
            grid_values[key] = list(args)
        out[key] = {kind: copy.deepcopy(args)}
    return out, grid_values


def _parse_distribution(dist: Any, where: str) -> tuple[str, Any]:
    """One search-space entry -> (distribution, args); a bare list is shorthand for a grid."""
    if isinstance(dist, list):
        dist = {"grid_search": dist}
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)} "
                          f"(e.g. {{grid_search: [4, 8]}}); got {dist!r}")
    kind, args = next(iter(dist.items()))
    if kind in ("grid_search", "choice"):
        if not isinstance(args, list):
            raise ConfigError(f"{where}.{kind}: expected a list of values (got {args!r})")
        if not args:
            raise ConfigError(f"{where}.{kind}: empty grid; give at least one value")
        return kind, args
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
    return kind, args


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


# ----------------------------------------------------------------------------------------- config values


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> dict[str, Any]:
    """A copy of `raw` with `a.b.c = value`, exactly as `--set a.b.c=value` would do it."""
    text = yaml.safe_dump(plain(value), default_flow_style=True, width=1 << 30).strip()
    text = text.removesuffix("...").strip()              # the document-end marker safe_dump adds to scalars
    try:
        return apply_overrides(raw, [f"{key}={text}"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('--set ')}") from None


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`base` with each dotted key of `values` set (a copy unless `values` is empty)."""
    raw = base
    for key, value in values.items():
        raw = set_dotted(raw, key, value, where=f"search_space.{key}")
    return raw


def plain(v: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python scalars."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v


def grid_combinations(spec: SweepSpec, cap: int = MAX_COMBOS_CHECKED) -> list[dict[str, Any]]:
    """The first `cap` combinations of the grid/choice values (and seeds)."""
    keys = list(spec.grid_values)
    product = itertools.product(*(spec.grid_values[k] for k in keys))
    return [dict(zip(keys, values)) for values in itertools.islice(product, cap)]


def _validate(raw: dict[str, Any], where: str) -> ExperimentConfig:
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
        if sep and kind in FILE_SOURCES and path and not os.path.isabs(path):
            data["source"] = f"{kind}:{os.path.abspath(path)}"
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        name = model["name"]
        if ":" not in name and Path(name).is_dir():
            model["name"] = os.path.abspath(name)
    return out


# ----------------------------------------------------------------------------------------- checks before Ray


def _representatives(spec: SweepSpec):
    """The base with each swept key set to each representative value, one key at a time."""
    for key, dist in spec.search_space.items():
        for value in _values_to_check(dist):
            yield set_dotted(spec.base, key, value, where=f"search_space.{key}")
    for s in spec.seeds or []:
        yield set_dotted(spec.base, "seed", s, where="seeds")
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
            raw = set_dotted(spec.base, key, value, where=f"search_space.{key}")
            _validate(raw, f"search_space.{key}={value!r}")
    combos = grid_combinations(spec)
    if len(spec.grid_values) > 1:
        for combo in combos:
            _validate(apply_values(spec.base, combo), "search_space: the combination "
                      + ", ".join(f"{k}={v!r}" for k, v in combo.items()))
    if check_data:
        _check_data(spec, combos)


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
        cfg = _validate(apply_values(spec.base, part), what)
        try:
            prepare_data(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None
