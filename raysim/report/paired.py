"""One comparison of a claim inside one sweep: select the trials of side a and side b, pair them, take the
per-pair differences a − b and give the verdict.

Pairing: a trial of a and a trial of b form a pair when they share the seed and the value of every swept
column that neither a nor b (nor best_of) names, so the pair differs only in what the comparison compares.
Only completed trials with a value of the metric take part.

Verdict rule (d = the per-pair differences a − b, mean(d) their mean):
- greater: reproduced when mean(d) > 0 and every d > 0; contradicted when every d < 0;
- less: reproduced when mean(d) < 0 and every d < 0; contradicted when every d > 0;
- similar: reproduced when |mean(d)| <= tolerance;
- at_least: reproduced when mean(d) >= -tolerance; contradicted when every d < -tolerance;
- otherwise not reproduced at this scale; and not run when the pairs cover fewer than 3 seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from raysim.errors import ConfigError
from raysim.report.claims_spec import Comparison

MIN_SEEDS = 3
REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
NOT_REPRODUCED = "not reproduced at this scale"
NOT_RUN = "not run"
EXPECT_WORDS = {"greater": "a > b", "less": "a < b", "similar": "a ≈ b", "at_least": "a ≥ b"}
_MISSING = object()


@dataclass
class Outcome:
    """The result of one comparison: the pairs (columns: the pairing keys, a, b, diff) and the verdict."""
    comparison: Comparison
    label_a: str
    label_b: str
    verdict: str
    reason: str
    pairs: Any = None                          # a pandas DataFrame, None when not run
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)   # best_of value chosen per side


class NotRun(Exception):
    """Why a comparison (or a claim) has no verdict: the sweep or enough completed trials are missing."""


def resolve(df, key: str, where: str, source: str) -> tuple[str, tuple[str, ...]]:
    """The column a selector key reads, and the path inside that column's JSON ((): the column itself)."""
    if key in df.columns:
        return key, ()
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        col = ".".join(parts[:i])
        if col in df.columns and _is_json_column(df[col]):
            return col, tuple(parts[i:])
    raise ConfigError(f"{where}: {key} is not a column of {source} nor a key inside one of its JSON columns "
                      f"(columns: {', '.join(map(str, df.columns))})")


def _is_json_column(series) -> bool:
    return any(isinstance(v, str) and v.startswith("{") for v in series.dropna())


def cell(value: Any, path: tuple[str, ...]) -> Any:
    """`value`, or the entry at `path` inside the JSON mapping `value`; _MISSING where there is none."""
    if not path:
        return value
    try:
        d = json.loads(value)
    except (TypeError, ValueError):
        return _MISSING
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return _MISSING
        d = d[key]
    return d


def equal(value: Any, want: Any) -> bool:
    """A cell equals a value from the claims file (numbers to float round-off, JSON text as its mapping)."""
    value = value.item() if hasattr(value, "item") else value
    if value is _MISSING or value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(want, bool) or isinstance(value, bool):
        return value is want or value == want and type(value) is type(want)
    if isinstance(want, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(want, (dict, list)) and isinstance(value, str):
        return json_value(value) == want
    return value == want


def json_value(text: str) -> Any:
    """The JSON value of a cell's text (e.g. a whole-section column); _MISSING when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return _MISSING


def label(selector: dict[str, Any]) -> str:
    """A short name for one side: 'fedex', 'lora_fair, lam=0.01', 'fedex, num_clients=100'."""
    parts = []
    for key, value in selector.items():
        last = key.rsplit(".", 1)[-1]
        parts.append(str(value) if last == "name" else f"{last}={value}")
    return ", ".join(parts)


def compare(df, dims: list[str], comp: Comparison, metric_of: Callable, source: str,
            higher_is_better: bool = True) -> Outcome:
    """The outcome of `comp` on the trials table `df` (swept columns `dims`). `metric_of(rows)` gives the
    metric of each row of a frame of trials (NaN where a trial has none); `higher_is_better` says which
    value of a best_of column is the best."""
    named = {resolve(df, k, f"{comp.where}.{side}", source)[0]
             for side in ("a", "b") for k in getattr(comp, side)}
    best = {resolve(df, k, f"{comp.where}.best_of", source)[0] for k in comp.best_of}
    keys = ["seed"] + [d for d in dims if d not in named | best and d != "seed"]
    out = Outcome(comp, label(comp.a), label(comp.b), NOT_RUN, "")
    try:
        sides = {s: _side(df, s, comp, keys, metric_of, source, out, higher_is_better) for s in ("a", "b")}
    except NotRun as exc:
        out.reason = str(exc)
        return out
    pairs = sides["a"].merge(sides["b"], on=keys, suffixes=("_a", "_b"))
    pairs = pairs[keys + ["trial_a", "trial_b", "value_a", "value_b"]].rename(
        columns={"value_a": "a", "value_b": "b"}).sort_values(keys, kind="stable").reset_index(drop=True)
    pairs["diff"] = pairs["a"] - pairs["b"]
    seeds = pairs["seed"].nunique()
    if seeds < MIN_SEEDS:
        out.reason = (f"only {len(pairs)} completed pair(s) over {seeds} seed(s) (a: {len(sides['a'])} completed "
                      f"trial(s) with a value, b: {len(sides['b'])}); at least {MIN_SEEDS} seeds are needed")
        return out
    out.pairs = pairs
    out.verdict, out.reason = verdict(list(pairs["diff"]), comp.expect, comp.tolerance)
    return out


def _side(df, side: str, comp: Comparison, keys: list[str], metric_of: Callable, source: str, out: Outcome,
          higher_is_better: bool):
    """The completed trials of one side with their metric ('value'), one per pairing key."""
    selector = getattr(comp, side)
    mask = df.index == df.index
    for key, want in selector.items():
        col, path = resolve(df, key, f"{comp.where}.{side}", source)
        mask &= df[col].map(lambda v, p=path, w=want: equal(cell(v, p), w)).to_numpy(dtype=bool)
        if not mask.any():
            raise NotRun(f"no trial of the sweep has {key} = {want} together with the rest of {side}: {selector}")
    rows = df[mask & (df["status"] == "completed").to_numpy()]
    rows = rows.assign(value=metric_of(rows) if len(rows) else []).dropna(subset=["value"])
    if comp.best_of and len(rows):
        rows, out.chosen[side] = _best(rows, comp, source, higher_is_better)
    dup = rows.duplicated(subset=keys)
    if dup.any():
        raise ConfigError(f"{comp.where}.{side}: selects several completed trials with the same "
                          f"{', '.join(keys)} (e.g. {', '.join(rows.loc[dup, 'trial'].astype(str)[:3])}); name "
                          f"the swept key that tells them apart")
    return rows[keys + ["trial", "value"]]


def _best(rows, comp: Comparison, source: str, higher_is_better: bool):
    """The rows at the best_of values with the best mean metric over the side's trials."""
    cols = [resolve(rows, k, f"{comp.where}.best_of", source) for k in comp.best_of]
    chosen = rows.assign(_key=[json.dumps([_plain(cell(r[c], p)) for c, p in cols]) for _, r in rows.iterrows()])
    means = chosen.groupby("_key")["value"].mean()
    key = means.idxmax() if higher_is_better else means.idxmin()
    values = dict(zip(comp.best_of, json.loads(key)))
    return chosen[chosen["_key"] == key].drop(columns="_key"), values


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if v is _MISSING else v


def verdict(diffs: list[float], expect: str, tol: float) -> tuple[str, str]:
    """The verdict on the per-pair differences a − b and the reason, by the rule of the module docstring."""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    if expect == "similar":
        ok = abs(mean) <= tol
        return (REPRODUCED if ok else NOT_REPRODUCED,
                f"|mean a − b| = {abs(mean):.3g} {'≤' if ok else '>'} tolerance {tol:g}")
    if expect == "at_least":
        if mean >= -tol:
            return REPRODUCED, f"mean a − b = {mean:.3g} ≥ −tolerance (−{tol:g})"
        below = sum(d < -tol for d in diffs)
        if below == n:
            return CONTRADICTED, f"all {n} pairs have a − b < −tolerance (−{tol:g})"
        return NOT_REPRODUCED, f"mean a − b = {mean:.3g} < −{tol:g}; {below} of {n} pairs are below −{tol:g}"
    sign, good, bad = (">", pos, neg) if expect == "greater" else ("<", neg, pos)
    opposite = "<" if sign == ">" else ">"
    if good == n:
        return REPRODUCED, f"all {n} pairs have a − b {sign} 0"
    if bad == n:
        return CONTRADICTED, f"all {n} pairs have a − b {opposite} 0, the opposite of the expected sign"
    return NOT_REPRODUCED, f"only {good} of {n} pairs have a − b {sign} 0; the rule needs all of them"
