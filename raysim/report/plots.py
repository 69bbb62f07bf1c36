"""The report's figures (matplotlib, Agg backend, imported on first use). Each function returns a
saved PNG path or a figure for `save`."""

from __future__ import annotations

import textwrap
from pathlib import Path

from raysim.report.fmt import fmt_value, sorted_unique
from raysim.report.load import AGG, ALPHA
from raysim.report.paired import EXPECT_WORDS

MARKERS = "osD^vP*X"
LINESTYLES = ["-", "--", ":", "-."]

# axis labels, each with its unit (a ratio or fraction says so)
ROUND_LABEL = "round (federated rounds)"
ACCURACY_LABEL = "accuracy (fraction correct, 0–1)"
FINAL_ACCURACY_LABEL = "final test accuracy (fraction correct, 0–1)"
DEVIATION_LABEL = "deviation_rel (ratio, log scale)"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _styles(aggs: list) -> dict:
    """One colour and marker per aggregator, the same in every plot of a report."""
    return {a: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]} for i, a in enumerate(sorted(aggs, key=str))}


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def round_plot(rounds, series: list[tuple[str, str]], ylabel: str, title: str, path: Path,
               log: bool = False) -> Path:
    """One PNG of per-round columns (those present and not all null)."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for col, label in series:
        if col in rounds and rounds[col].notna().any():
            d = rounds.dropna(subset=[col])
            ax.plot(d["round"], d[col], marker="o", label=label)
            _integer_x(ax)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel=ROUND_LABEL, ylabel=ylabel, title=title)
    ax.legend()
    return save(fig, path)


def accuracy_vs(done, dim: str, label: str, logx: bool, base_agg: str):
    """Final accuracy (mean ± std) against one swept key, a line per aggregator; None without data."""
    data = done.dropna(subset=["accuracy"])
    if not len(data):
        return None
    xs_all = sorted_unique(data[dim])
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    positions = {x: (x if numeric else i) for i, x in enumerate(xs_all)}
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    by_agg = list(data.groupby(AGG)) if AGG in data else [(base_agg, data)]
    styles = _styles([a for a, _ in by_agg])
    for agg, g in by_agg:
        stats = g.groupby(dim)["accuracy"].agg(["mean", "std", "count"]).reset_index()
        stats = stats.sort_values(dim, key=lambda s: s.map(lambda v: positions[v]))
        x = [positions[v] for v in stats[dim]]
        ax.errorbar(x, stats["mean"], yerr=stats["std"].fillna(0.0), capsize=3, label=str(agg), alpha=0.85,
                    markerfacecolor="none", markersize=8, **styles[agg])
    if numeric and logx and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        ax.set_xscale("log")
    ax.set_xticks(xs_all if numeric else range(len(xs_all)))
    ax.set_xticklabels([fmt_value(x) for x in xs_all])
    if numeric:
        ax.minorticks_off()
    ax.set(xlabel=label, ylabel=FINAL_ACCURACY_LABEL,
           title=f"Final accuracy vs {dim} (mean ± std over seeds and other swept keys)")
    ax.title.set_fontsize(9)
    ax.legend(title="aggregator", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def deviation_bars(done):
    """Final deviation_rel per aggregator (log scale); bars grouped by non-IID alpha when it was swept."""
    import numpy as np

    data = done.dropna(subset=["deviation_rel"])
    aggs = sorted(data[AGG].unique(), key=str)
    groups = sorted_unique(data[ALPHA]) if ALPHA in data else [None]
    positive = data["deviation_rel"][data["deviation_rel"] > 0]
    floor = max(1e-16, float(positive.min()) / 100) if len(positive) else 1e-16
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    width = 0.8 / len(groups)
    for j, alpha in enumerate(groups):
        sub = data if alpha is None else data[data[ALPHA] == alpha]
        stats = sub.groupby(AGG)["deviation_rel"].agg(["mean", "std"]).reindex(aggs)
        x = np.arange(len(aggs)) + (j - (len(groups) - 1) / 2) * width
        means = stats["mean"].fillna(floor).clip(lower=floor)
        ax.bar(x, means, width=width, yerr=stats["std"].fillna(0.0), capsize=2,
               label=None if alpha is None else f"alpha {fmt_value(alpha)}", color=f"C{j + 1}")
        for xi, v, m in zip(x, stats["mean"], means):
            ax.annotate("-" if v != v else f"{v:.0e}", (xi, float(m)), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(aggs)))
    ax.set_xticklabels([str(a) for a in aggs])
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    if groups != [None]:
        ax.legend(title="non-IID level", fontsize=8)
    ax.set(xlabel="aggregator (method name)", ylabel=f"final {DEVIATION_LABEL}",
           title="Aggregation deviation ‖ideal − applied‖/‖ideal‖ (mean ± std over trials)")
    ax.title.set_fontsize(9)
    return fig


def accuracy_curves(allr, alpha_swept: bool):
    """Mean test accuracy per round for each aggregator (and non-IID level when swept), from the
    frame of `load.trial_rounds`."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    styles = _styles(list(allr["agg"].unique()))
    alphas = sorted_unique(allr["alpha"]) if alpha_swept else [None]
    for agg in sorted(allr["agg"].unique(), key=str):
        for k, alpha in enumerate(alphas):
            g = allr[allr["agg"] == agg] if alpha is None else allr[(allr["agg"] == agg) & (allr["alpha"] == alpha)]
            if not len(g):
                continue
            s = g.groupby("round")["accuracy"].agg(["mean", "std"]).reset_index()
            label = str(agg) if alpha is None else f"{agg}, alpha {fmt_value(alpha)}"
            ax.plot(s["round"], s["mean"], linestyle=LINESTYLES[k % len(LINESTYLES)], label=label, alpha=0.85,
                    markerfacecolor="none", **styles[agg])
            ax.fill_between(s["round"], s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                            alpha=0.08, color=styles[agg]["color"])
    _integer_x(ax)
    ax.set(xlabel=ROUND_LABEL, ylabel=f"test {ACCURACY_LABEL}",
           title="Accuracy per round (mean ± std over seeds and other swept keys)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# units of the metrics a claim may compare (the y-axis of claim-<id>.png); any other: "metric units"
METRIC_UNITS = {"accuracy": "fraction correct, 0–1", "best_accuracy": "fraction correct, 0–1",
                "exact_match": "fraction of prompts answered exactly, 0–1",
                "personalized_accuracy": "fraction correct on own test split, 0–1",
                "personalized_accuracy_mean": "fraction correct on own test split, 0–1",
                "personalized_accuracy_p10": "fraction correct on own test split, 0–1",
                "deviation_rel": "ratio ‖ideal − applied‖/‖ideal‖", "max_deviation_rel": "ratio",
                "bytes_up": "bytes", "bytes_down": "bytes", "loss": "nats", "train_loss": "nats",
                "perplexity": "exp(nats per token)", "wall_s": "seconds"}


def metric_label(metric) -> str:
    """The axis label of a claim's metric (a claims_spec.Metric), with its unit."""
    unit = METRIC_UNITS.get(metric.column, "metric units")
    if metric.reducer is None:
        return f"final {metric.column} ({unit})"
    return f"{metric.column} per round, {metric.reducer} over rounds ({unit})"


def claim_plot(claim, outcomes):
    """One panel per comparison that has pairs: each pair's b and a joined by a line, and the mean ± std of
    each side; None when no comparison has pairs."""
    shown = [(i, o) for i, o in enumerate(outcomes, start=1) if o.pairs is not None]
    if not shown:
        return None
    fig, axes = pyplot().subplots(1, len(shown), figsize=(3.4 * len(shown) + 0.6, 4.0), squeeze=False)
    values = [v for _, o in shown for v in list(o.pairs["a"]) + list(o.pairs["b"])]
    log = "deviation" in claim.metric.column and min(values) > 0 and max(values) > 100 * min(values)
    for ax, (i, o) in zip(axes[0], shown):
        keys = [k for k in o.pairs.columns if k not in ("a", "b", "diff", "trial_a", "trial_b")]
        for k, (_, p) in enumerate(o.pairs.iterrows()):
            ax.plot([0, 1], [p["b"], p["a"]], marker=MARKERS[k % len(MARKERS)], color=f"C{k % 10}", alpha=0.7,
                    label=", ".join(f"{key} {fmt_value(p[key])}" for key in keys) if len(o.pairs) <= 8 else None)
        for x, col in ((-0.15, "b"), (1.15, "a")):
            ax.errorbar([x], [o.pairs[col].mean()], yerr=[o.pairs[col].std(ddof=1)], fmt="s", color="black",
                        capsize=4)
        ax.set_xticks([0, 1])
        ax.set_xticklabels([f"b: {o.label_b}", f"a: {o.label_a}"], fontsize=8)
        ax.set_xlim(-0.4, 1.4)
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="setting compared (black: mean ± std)",
               title=f"{i}: expected {EXPECT_WORDS[o.comparison.expect]} — {o.verdict}")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    # one y label for the row, wrapped: the metric's name with its unit is long
    axes[0][0].set_ylabel(textwrap.fill(metric_label(claim.metric), 34), fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{claim.id}: paired trials per seed", fontsize=9)
    fig.tight_layout()
    return fig



def breakdown_plot(claim_id: str, breakdown):
    """A per_module_deviation breakdown (raysim.report.breakdown): one line per setting over the adapter
    modules in layer order, mean ± std over seeds, log y when the values span more than 2 decades; None for
    another breakdown or one without data."""
    from raysim.report.breakdown import PER_MODULE_DEVIATION
    from raysim.report.fmt import mean_and_std

    if breakdown is None or breakdown.kind != PER_MODULE_DEVIATION or not breakdown.values:
        return None
    rows = breakdown.rows
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.6 * len(rows) + 2.5), 4.2))
    styles = _styles(breakdown.settings)
    for setting in breakdown.settings:
        points = [(i, *mean_and_std(breakdown.values[(row, setting)])) for i, row in enumerate(rows)
                  if (row, setting) in breakdown.values]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                    capsize=3, label=f"{setting} (n={breakdown.seeds[setting]})", alpha=0.85,
                    markerfacecolor="none", markersize=7, **styles[setting])
    positive = [v for vals in breakdown.values.values() for v in vals if v > 0]
    if positive and max(positive) > 100 * min(positive):
        ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([breakdown.row_label(r) for r in rows], rotation=30 if len(rows) > 4 else 0,
                       ha="right" if len(rows) > 4 else "center", fontsize=8)
    ax.set(xlabel="adapter module, in layer order",
           ylabel=textwrap.fill("deviation_rel, mean over rounds (ratio ‖ideal − applied‖/‖ideal‖)", 34))
    ax.yaxis.label.set_fontsize(8)
    ax.set_title(f"{claim_id}: deviation per module (mean ± std over seeds)", fontsize=9)
    ax.legend(title="setting", fontsize=8)
    ax.grid(alpha=0.3)
    return fig
