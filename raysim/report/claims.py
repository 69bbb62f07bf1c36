"""`raysim report ROOT --claims FILE --out DIR`: one document, DIR/reproduction.md (with a PNG per claim
next to it, written by `write_document`), that checks each paper claim of FILE (e.g.
experiments/reproduce/claims.yaml) against the sweep folder ROOT/<claim's sweep> by paired comparisons
across seeds (the pairing and the verdict rule are in `raysim.report.paired`).

A claim's verdict combines those of its comparisons: contradicted when any comparison is; otherwise not run
when any comparison could not be made (sweep folder missing, fewer than 3 seeds of completed pairs);
otherwise reproduced when all are; otherwise not reproduced at this scale. A missing sweep or missing
trials never stop the document: the claim says "not run" and why. A claims file that names a column the
sweep does not have raises ConfigError (the CLI exits with 2). A claim with `breakdown:` also gets the numbers
behind its verdict per setting (`raysim.report.breakdown`); they never change the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from raysim.errors import ConfigError
from raysim.report.breakdown import Breakdown, compute
from raysim.report.claims_spec import Claim, load_claims
from raysim.report.load import read_yaml, rounds_frame, swept_dims, trial_run
from raysim.report.paired import CONTRADICTED, NOT_REPRODUCED, NOT_RUN, REPRODUCED, Outcome, compare
from raysim.storage import RunStorage

DOCUMENT = "reproduction.md"


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    reason: str = ""                           # why the claim was not run (sweep missing)
    outcomes: list[Outcome] = field(default_factory=list)
    sweep_uri: str = ""
    png: str | None = None
    breakdown: Breakdown | None = None         # when the claim asks for one and its sweep exists
    breakdown_png: str | None = None


def claims_report(root: RunStorage, claims_file: "str | Path", shown_root: str = "") -> list[ClaimResult]:
    """Every claim of the file checked against its sweep under `root` (ConfigError for a bad claims file).
    `shown_root` is how the document names the root (as typed on the command line; default its URI)."""
    return [evaluate(root, claim, shown_root or root.uri()) for claim in load_claims(claims_file)]


def write_document(results: list[ClaimResult], dest: Path, root: str, claims_file: str, command: str) -> Path:
    """reproduction.md and the claims' PNGs, written into the local folder `dest`; returns the markdown."""
    from raysim.report.claims_md import render
    from raysim.report.plots import breakdown_plot, claim_plot, save

    for r in results:
        fig = claim_plot(r.claim, r.outcomes)
        if fig is not None:
            r.png = save(fig, dest / f"claim-{r.claim.id}.png").name
        fig = breakdown_plot(r.claim.id, r.breakdown)
        if fig is not None:
            r.breakdown_png = save(fig, dest / f"claim-{r.claim.id}-breakdown.png").name
    doc = dest / DOCUMENT
    doc.write_text(render(results, root, claims_file, command))
    return doc


def evaluate(root: RunStorage, claim: Claim, shown_root: str) -> ClaimResult:
    """Every comparison of `claim` on the sweep ROOT/<claim.sweep>, and the claim's verdict."""
    sweep, shown = root.child(claim.sweep), shown_child(root, shown_root, claim.sweep)
    if not sweep.exists("trials.parquet"):
        return ClaimResult(claim, NOT_RUN, f"no trials.parquet in `{shown}` (the sweep has not been run there "
                                           "yet)", sweep_uri=shown)
    df = sweep.read_parquet("trials.parquet").to_pandas()
    source = sweep.uri("trials.parquet")
    for col in ("trial", "seed", "status"):
        if col not in df.columns:
            raise ConfigError(f"{source}: no {col} column (not a raysim sweep's trials table)")
    dims = swept_dims(df, read_yaml(sweep, "sweep.yaml"))
    reader = MetricReader(claim, sweep, df)
    outcomes = [compare(df, dims, comp, reader, source, claim.higher_is_better) for comp in claim.comparisons]
    reader.check_seen()
    breakdown = compute(claim.breakdown, sweep, df, dims) if claim.breakdown else None
    return ClaimResult(claim, combine([o.verdict for o in outcomes]), outcomes=outcomes, sweep_uri=shown,
                       breakdown=breakdown)


def shown_child(root: RunStorage, shown_root: str, name: str) -> str:
    """How the document names ROOT/name: joined to ROOT as typed when local, else the URI (options last)."""
    return f"{shown_root.rstrip('/')}/{name}" if root.is_local else root.child(name).uri()


def combine(verdicts: list[str]) -> str:
    """A claim's verdict from its comparisons' (see the module docstring)."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if NOT_RUN in verdicts:
        return NOT_RUN
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else NOT_REPRODUCED


class MetricReader:
    """The claim's metric for a frame of trials: a trials.parquet column, or a rounds.parquet column of each
    trial reduced over its rounds (each trial read once)."""

    def __init__(self, claim: Claim, sweep: RunStorage, df):
        self.claim, self.sweep, self.metric = claim, sweep, claim.metric
        self.cache: dict[str, float] = {}
        self.rounds_read = self.column_seen = False
        if self.metric.reducer is None and self.metric.column not in df.columns:
            raise ConfigError(f"{claim.where}.metric: {self.metric.column} is not a column of "
                              f"{sweep.uri('trials.parquet')} (columns: {', '.join(map(str, df.columns))})")

    def __call__(self, rows):
        import pandas as pd

        if self.metric.reducer is None:
            return pd.to_numeric(rows[self.metric.column], errors="coerce").astype(float)
        return pd.Series([self._reduced(r["trial"], r.get("run_dir")) for _, r in rows.iterrows()],
                         index=rows.index, dtype=float)

    def _reduced(self, trial, recorded) -> float:
        trial = str(trial)
        if trial not in self.cache:
            self.cache[trial] = self._read(trial, recorded)
        return self.cache[trial]

    def _read(self, trial: str, recorded) -> float:
        run = trial_run(self.sweep, trial, recorded)
        if run is None:
            return float("nan")
        frame = rounds_frame(run)
        self.rounds_read = True
        if self.metric.column not in frame.columns:
            return float("nan")
        self.column_seen = True
        values = frame[self.metric.column].dropna().astype(float)
        if not len(values):
            return float("nan")
        return float(values.iloc[-1] if self.metric.reducer == "last" else getattr(values, self.metric.reducer)())

    def check_seen(self) -> None:
        """A rounds metric whose column no trial's rounds.parquet has is a mistake in the claims file."""
        if self.rounds_read and not self.column_seen:
            raise ConfigError(f"{self.claim.where}.metric: {self.metric.column} is not a column of the "
                              f"rounds.parquet of the trials in {self.sweep.uri()}")
