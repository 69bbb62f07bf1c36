"""The claims file of `raysim report ROOT --claims FILE` (e.g. experiments/reproduce/claims.yaml): read and
checked before any sweep is opened. A mistake raises ConfigError naming the key (the CLI exits with 2).

The file is a mapping with one key, `claims`, a list of entries:

    - id: fedex_glue_accuracy             # letters, digits, '_' or '-'; names the claim's PNG
      paper: FedEx-LoRA (Singhal et al., 2025)
      sweep: fedex_glue                   # the sweep's folder under ROOT
      setting: ...                        # the paper's setting, one sentence
      paper_result: ...                   # the paper's number or claim, in words
      scale: ...                          # what the sweep scaled down
      metric: accuracy                    # a trials.parquet column, or rounds:<column>:<reducer>
      higher_is_better: true
      comparisons:
        - {a: {aggregator.name: fedex}, b: {aggregator.name: fedit}, expect: greater}

`rounds:<column>:<reducer>` reads `column` from each trial's rounds.parquet and reduces its non-null values
with last, mean, max, min or sum. A comparison's `a` and `b` select trials by equality on trials.parquet
columns (or on a key inside a JSON column: `aggregator.lam` inside the `aggregator` column). `expect` is
greater, less, similar or at_least; `tolerance` (metric units) is required for similar and at_least.
`best_of: [column, ...]` compares each side at its best value of those columns (by the mean metric over its
completed trials, chosen separately for a and b), e.g. each method at its better learning rate.

The optional key `breakdown` adds the numbers behind the verdict, per setting of the sweep, after the claim's
comparisons (`raysim.report.breakdown`; it never changes the verdict):

      breakdown: per_module_deviation     # deviation_rel per adapter module (each trial's modules.parquet)
      breakdown: slot_dilution            # per rank slot, how much survived aggregation (each trial's updates/,
                                          # written with output.save_updates: true; see raysim.dilution)

The optional key `discussion` (text) is the authors' reading of the result — why it comes out as it does —
shown under the verdict. Keep numbers out of it (the tables above it carry them and regenerate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raysim.errors import ConfigError

EXPECTS = ("greater", "less", "similar", "at_least")
REDUCERS = ("last", "mean", "max", "min", "sum")
CLAIM_KEYS = ("id", "paper", "sweep", "setting", "paper_result", "scale", "metric", "higher_is_better",
              "comparisons")
OPTIONAL_CLAIM_KEYS = ("breakdown", "discussion")
PER_MODULE_DEVIATION = "per_module_deviation"
SLOT_DILUTION = "slot_dilution"
BREAKDOWNS = (PER_MODULE_DEVIATION, SLOT_DILUTION)
TEXT_KEYS = ("paper", "setting", "paper_result", "scale")
COMPARISON_KEYS = ("a", "b", "expect", "tolerance", "best_of")


@dataclass(frozen=True)
class Metric:
    """A trials.parquet column (reducer None), or a rounds.parquet column reduced over each trial's rounds."""
    column: str
    reducer: str | None
    text: str                                  # as written in the claims file

    def describe(self) -> str:
        if self.reducer is None:
            return f"`{self.column}` (final value of each trial, trials.parquet)"
        return f"`{self.column}` per round, {self.reducer} over each trial's rounds (rounds.parquet)"


@dataclass(frozen=True)
class Comparison:
    a: dict[str, Any]
    b: dict[str, Any]
    expect: str
    tolerance: float
    best_of: tuple[str, ...]
    where: str                                 # e.g. "claims.yaml: claims[0] (fedex_glue).comparisons[1]"


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    sweep: str
    setting: str
    paper_result: str
    scale: str
    metric: Metric
    higher_is_better: bool
    comparisons: tuple[Comparison, ...]
    where: str
    breakdown: str | None = None               # one of BREAKDOWNS
    discussion: str | None = None              # the authors' reading of the result, shown under the verdict


def load_claims(path: "str | Path") -> list[Claim]:
    """Every claim of the file, checked; a ConfigError naming the key for any mistake."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--claims: {p} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--claims: {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or set(raw) != {"claims"} or not isinstance(raw["claims"], list) \
            or not raw["claims"]:
        raise ConfigError(f"{p.name}: expected a mapping with one key, claims: a non-empty list of claims")
    claims = [_claim(entry, f"{p.name}: claims[{i}]") for i, entry in enumerate(raw["claims"])]
    seen: set[str] = set()
    for c in claims:
        if c.id in seen:
            raise ConfigError(f"{c.where}.id: {c.id!r} is used by an earlier claim; ids must be unique")
        seen.add(c.id)
    return claims


def _claim(raw: Any, where: str) -> Claim:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(CLAIM_KEYS)}")
    _check_keys(raw, CLAIM_KEYS + OPTIONAL_CLAIM_KEYS, CLAIM_KEYS, where)
    cid = raw["id"]
    if not isinstance(cid, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", cid):
        raise ConfigError(f"{where}.id: letters, digits, '_' or '-' (got {cid!r})")
    where = f"{where} ({cid})"
    for key in TEXT_KEYS + ("sweep",):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise ConfigError(f"{where}.{key}: expected a non-empty string")
    if not isinstance(raw["higher_is_better"], bool):
        raise ConfigError(f"{where}.higher_is_better: expected true or false (got {raw['higher_is_better']!r})")
    comps = raw["comparisons"]
    if not isinstance(comps, list) or not comps:
        raise ConfigError(f"{where}.comparisons: expected a non-empty list of {{a: ..., b: ..., expect: ...}}")
    discussion = raw.get("discussion")
    if discussion is not None and (not isinstance(discussion, str) or not discussion.strip()):
        raise ConfigError(f"{where}.discussion: expected a non-empty string")
    breakdown = raw.get("breakdown")
    if breakdown is not None and breakdown not in BREAKDOWNS:
        raise ConfigError(f"{where}.breakdown: {breakdown!r} is not one of {', '.join(BREAKDOWNS)}")
    return Claim(id=cid, sweep=raw["sweep"].strip(), metric=_metric(raw["metric"], f"{where}.metric"),
                 higher_is_better=raw["higher_is_better"],
                 comparisons=tuple(_comparison(c, f"{where}.comparisons[{j}]") for j, c in enumerate(comps)),
                 where=where, breakdown=breakdown, discussion=discussion and " ".join(discussion.split()),
                 **{k: " ".join(raw[k].split()) for k in TEXT_KEYS})


def _metric(raw: Any, where: str) -> Metric:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected a trials.parquet column or rounds:<column>:<reducer> (got {raw!r})")
    if not raw.startswith("rounds:"):
        return Metric(column=raw, reducer=None, text=raw)
    parts = raw.split(":")
    if len(parts) != 3 or not parts[1] or parts[2] not in REDUCERS:
        raise ConfigError(f"{where}: {raw!r}: expected rounds:<column>:<reducer> with reducer one of "
                          f"{', '.join(REDUCERS)}")
    return Metric(column=parts[1], reducer=parts[2], text=raw)


def _comparison(raw: Any, where: str) -> Comparison:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping {{a: ..., b: ..., expect: ...}}")
    _check_keys(raw, COMPARISON_KEYS, ("a", "b", "expect"), where)
    for side in ("a", "b"):
        sel = raw[side]
        if not isinstance(sel, dict) or not sel or not all(isinstance(k, str) and k for k in sel):
            raise ConfigError(f"{where}.{side}: expected a non-empty mapping of column: value")
    if raw["expect"] not in EXPECTS:
        raise ConfigError(f"{where}.expect: {raw['expect']!r} is not one of {', '.join(EXPECTS)}")
    tol = raw.get("tolerance")
    if raw["expect"] in ("similar", "at_least") and tol is None:
        raise ConfigError(f"{where}.tolerance: required for expect: {raw['expect']} (in metric units)")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0):
        raise ConfigError(f"{where}.tolerance: expected a number >= 0 (got {tol!r})")
    best_of = raw.get("best_of") or []
    if not isinstance(best_of, list) or not all(isinstance(k, str) and k for k in best_of):
        raise ConfigError(f"{where}.best_of: expected a list of column names (got {best_of!r})")
    named = [k for k in best_of if k in raw["a"] or k in raw["b"]]
    if named:
        raise ConfigError(f"{where}.best_of: {named[0]} is also fixed by a or b; name it in one place only")
    return Comparison(a=dict(raw["a"]), b=dict(raw["b"]), expect=raw["expect"], tolerance=float(tol or 0.0),
                      best_of=tuple(best_of), where=where)


def _check_keys(raw: dict, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(allowed)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: missing")
