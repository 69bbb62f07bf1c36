"""Reading run and sweep directories: which kind a directory is, its JSON/YAML files, the swept keys
of a sweep, its trials' per-round accuracy, and the config defaults that fill what a file leaves out.
A directory is a local path or a filesystem URI: everything is read through `raysim.storage.RunStorage`."""

from __future__ import annotations

import functools
import json
from typing import Any

import yaml

from raysim.config import ConfigError, ExperimentConfig
from raysim.metrics import read_rounds
from raysim.storage import RunStorage

AGG = "aggregator.name"
ALPHA = "data.partition.alpha"
NON_DIMS = {"trial", "trial_id", "seed"}


def directory_kind(src: RunStorage) -> str:
    """'sweep' (trials.parquet) or 'run' (rounds.parquet); a ConfigError for anything else."""
    if src.exists("trials.parquet"):
        return "sweep"
    if src.exists("rounds.parquet"):
        return "run"
    raise ConfigError(f"raysim report: {src.uri()} is neither a run directory (rounds.parquet) "
                      "nor a sweep directory (trials.parquet)")


def read_json(src: RunStorage, rel: str) -> dict[str, Any]:
    return json.loads(src.read_text(rel)) if src.is_file(rel) else {}


def read_yaml(src: RunStorage, rel: str) -> dict[str, Any]:
    return (yaml.safe_load(src.read_text(rel)) or {}) if src.is_file(rel) else {}


def rounds_frame(run: RunStorage):
    """A run's rounds.parquet as a pandas DataFrame, in round order."""
    import pandas as pd

    return pd.DataFrame(read_rounds(run))


def base_name(src: RunStorage) -> str:
    """The last part of a directory's path (its name)."""
    return src.root.rstrip("/").rsplit("/", 1)[-1]


@functools.cache
def _defaults() -> dict[str, Any]:
    return ExperimentConfig().model_dump(mode="json")


def dig(d: Any, keys: tuple[str, ...], default: Any = None) -> Any:
    """d[k0][k1]…, or `default` where a level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def config_value(cfg: dict[str, Any], *keys: str) -> Any:
    """A (possibly partial) config's value at `keys`, else the ExperimentConfig default."""
    return dig(cfg, keys, dig(_defaults(), keys))


def swept_dims(df, spec: dict[str, Any]) -> list[str]:
    """Swept keys other than the seed: from sweep.yaml when present, else the non-result columns."""
    from raysim.tune import RESULT_COLUMNS

    keys = list((spec.get("search_space") or {}).keys())
    if not keys:
        keys = [c for c in df.columns if c not in NON_DIMS and c not in RESULT_COLUMNS]
    return [k for k in keys if k in df.columns and k != "seed"]


def sweep_aggregator(spec: dict[str, Any]) -> str:
    """The aggregator of the sweep's base config (for sweeps that do not sweep it)."""
    base = spec.get("base")
    return config_value(base if isinstance(base, dict) else {}, "aggregator", "name")


def trial_rounds(df, sweep: RunStorage, dims: list[str], base_agg: str):
    """Per-round accuracy of every trial whose run directory is found (all trials, including those ASHA
    stopped), with columns round, accuracy, agg and alpha (None unless alpha was swept); None if none."""
    import pandas as pd

    frames = []
    for _, r in df.iterrows():
        run = trial_run(sweep, str(r["trial"]), r.get("run_dir"))
        if run is None:
            continue
        rounds = rounds_frame(run)[["round", "accuracy"]]
        rounds["agg"] = r[AGG] if AGG in df.columns else base_agg
        rounds["alpha"] = r[ALPHA] if ALPHA in dims else None
        frames.append(rounds)
    if not frames:
        return None
    allr = pd.concat(frames).dropna(subset=["accuracy"])
    return allr if len(allr) else None


def trial_run(sweep: RunStorage, trial: str, recorded: Any) -> RunStorage | None:
    """A trial's run directory: in the sweep directory as given (which may have been copied or moved), else
    where trials.parquet recorded it; None when neither has rounds.parquet."""
    candidates = [sweep.child(f"trials/{trial}")]
    if recorded:
        candidates.append(str(recorded))
    for candidate in candidates:
        try:
            run = RunStorage.of(candidate)
            if run.exists("rounds.parquet"):
                return run
        except (OSError, ValueError):          # a recorded location this machine cannot reach
            continue
    return None
