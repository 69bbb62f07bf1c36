"""The report of one sweep directory: a plot per swept key, deviation per aggregator, accuracy curves,
mean ± std over seeds per combination, the best trial and the per-trial table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raysim.report import plots
from raysim.report.fmt import fmt_float, fmt_value, slug, sorted_unique
from raysim.report.load import AGG, ALPHA, base_name, read_yaml, sweep_aggregator, swept_dims, trial_rounds
from raysim.report.tables import config_facts, group_table, trials_table
from raysim.storage import RunStorage

# known sweep dimensions: column -> (file name, axis label with its unit, log x-axis)
KNOWN_DIMS = {
    ALPHA: ("accuracy_vs_alpha.png", "non-IID level: Dirichlet alpha (dimensionless; small = skewed)", True),
    "lora.rank": ("accuracy_vs_rank.png", "LoRA rank (factor columns)", True),
    "federation.num_clients": ("accuracy_vs_clients.png", "number of clients (count)", True),
}

# units of other common sweep keys (the x-axis of accuracy_vs_<key>.png); any other key: "(config value)"
DIM_UNITS = {"train.lr": "learning rate per step", "train.local_steps": "optimizer steps per round",
             "train.local_epochs": "epochs per round", "train.batch_size": "examples per step",
             "federation.clients_per_round": "clients per round", "federation.rounds": "rounds",
             "lora.alpha": "scale numerator, s = alpha/rank", "train.weight_decay": "per step",
             "model.max_length": "tokens"}


def sweep_report(sweep: RunStorage, dest: Path) -> Path:
    """report.md and the PNGs of sweep directory `sweep` (local or a URI), written into the local folder `dest`."""
    df = sweep.read_parquet("trials.parquet").to_pandas()
    spec = read_yaml(sweep, "sweep.yaml")
    dims = swept_dims(df, spec)
    done = df[df["status"] == "completed"]
    pngs = _sweep_plots(df, done, sweep, dims, sweep_aggregator(spec), dest)
    lines = [f"# Sweep report: {spec.get('name') or base_name(sweep)}", ""]
    if spec.get("description"):
        lines += [str(spec["description"]).strip(), ""]
    lines += _facts(df, spec, sweep, dims)
    lines += ["", "## Results (final values of completed trials, mean ± std over seeds)", ""]
    lines += group_table(df, dims)
    if len(done) and done["accuracy"].notna().any():
        best = done.loc[done["accuracy"].idxmax()]
        lines += ["", f"Best trial: `{best['trial']}` — final accuracy {fmt_float(best['accuracy'])}, "
                      f"best accuracy {fmt_float(best['best_accuracy'])} (round {fmt_value(best['best_round'])})."]
    if (df["status"] == "stopped").any():
        lines += ["", "Trials stopped early by ASHA are not in the means above; the per-trial table lists them."]
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" + "\n" for p in pngs]
    lines += ["", "## Trials", ""] + trials_table(df, dims)
    report = dest / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _sweep_plots(df, done, sweep: RunStorage, dims: list[str], base_agg: str, dest: Path) -> list[Path]:
    pngs: list[Path] = []
    for dim in dims:
        if dim == AGG:
            continue
        default = (f"accuracy_vs_{slug(dim)}.png", f"{dim} ({DIM_UNITS.get(dim, 'config value')})", False)
        fname, label, logx = KNOWN_DIMS.get(dim, default)
        fig = plots.accuracy_vs(done, dim, label, logx, base_agg)
        if fig is not None:
            pngs.append(plots.save(fig, dest / fname))
    if AGG in dims and "deviation_rel" in done and done["deviation_rel"].notna().any():
        pngs.append(plots.save(plots.deviation_bars(done), dest / "deviation_per_aggregator.png"))
    allr = trial_rounds(df, sweep, dims, base_agg)
    if allr is not None:
        pngs.append(plots.save(plots.accuracy_curves(allr, ALPHA in dims), dest / "accuracy_curves.png"))
    return pngs


def _facts(df, spec: dict[str, Any], sweep: RunStorage, dims: list[str]) -> list[str]:
    counts = df["status"].value_counts().to_dict()
    scheduler = spec.get("scheduler")
    lines = [f"- directory: `{sweep.uri()}`",
             f"- trials: {len(df)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})",
             f"- metric: {spec.get('metric', 'accuracy')} ({spec.get('mode', 'max')})"
             + (f", scheduler: ASHA (grace {scheduler.get('grace_period')} rounds, reduction factor "
                f"{scheduler.get('reduction_factor')})" if scheduler else "")]
    base = spec.get("base") or {}
    if isinstance(base, dict):
        lines += [f"- base {k}: {v}" for k, v in config_facts(base).items()]
    for dim in dims:
        lines.append(f"- swept `{dim}`: {', '.join(fmt_value(v) for v in sorted_unique(df[dim]))}")
    if "seed" in df:
        lines.append(f"- seeds: {', '.join(str(int(s)) for s in sorted_unique(df['seed']))}")
    return lines
