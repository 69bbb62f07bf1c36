"""Reading run and sweep directories: which kind a directory is, its JSON/YAML files, the swept keys
of a sweep, its trials' per-round accuracy, and the config defaults that fill what a file leaves out."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml

from raysim.config import ConfigError, ExperimentConfig

AGG = "aggregator.name"
ALPHA = "data.partition.alpha"
NON_DIMS = {"trial", "trial_id", "seed"}


def directory_kind(path: Path) -> str:
    """'sweep' (trials.parquet) or 'run' (rounds.parquet); a ConfigError for anything else."""
    if (path / "trials.parquet").exists():
        return "sweep"
    if (path / "rounds.parquet").exists():
        return "run"
    raise ConfigError(f"raysim report: {path} is neither a run directory (rounds.parquet) "
                      "nor a sweep directory (trials.parquet)")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


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


def trial_rounds(df, sweep_dir: Path, dims: list[str], base_agg: str):
    """Per-round accuracy of every trial whose run directory is found (all trials, including those ASHA
    stopped), with columns round, accuracy, agg and alpha (None unless alpha was swept); None if none."""
    import pandas as pd

    frames = []
    for _, r in df.iterrows():
        run_dir = Path(str(r.get("run_dir") or ""))
        if not (run_dir / "rounds.parquet").exists():
            run_dir = sweep_dir / "trials" / str(r["trial"])      # the sweep dir moved
        if not (run_dir / "rounds.parquet").exists():
            continue
        rounds = pd.read_parquet(run_dir / "rounds.parquet", columns=["round", "accuracy"])
        rounds["agg"] = r[AGG] if AGG in df.columns else base_agg
        rounds["alpha"] = r[ALPHA] if ALPHA in dims else None
        frames.append(rounds)
    if not frames:
        return None
    allr = pd.concat(frames).dropna(subset=["accuracy"])
    return allr if len(allr) else None
