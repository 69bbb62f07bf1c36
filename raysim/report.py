"""`raysim report DIR`: plots (PNG) and a markdown summary from a run or a sweep directory.

- run directory (rounds.parquet): accuracy.png, loss.png, deviation.png (when measured) and report.md
  with the final and best metrics, totals and the per-round table;
- sweep directory (trials.parquet): final accuracy vs non-IID alpha per aggregator, vs LoRA rank, vs
  number of clients (and vs any other swept key), final deviation_rel per aggregator, mean accuracy per
  round per aggregator, and report.md with a mean ± std over seeds table. A plot is drawn only for a
  dimension the sweep actually swept.

Everything is read from the Parquet/JSON/YAML files, so a report can be made on another machine.
Output goes to DIR/report/ unless --out is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from raysim.config import ConfigError

# known sweep dimensions: column -> (file name, axis label, log x-axis)
KNOWN_DIMS = {
    "data.partition.alpha": ("accuracy_vs_alpha.png", "non-IID level: Dirichlet alpha (small = skewed)", True),
    "lora.rank": ("accuracy_vs_rank.png", "LoRA rank", True),
    "federation.num_clients": ("accuracy_vs_clients.png", "number of clients", True),
}
AGG = "aggregator.name"
NON_DIMS = {"trial", "trial_id", "seed"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report for a run or sweep directory; returns the path of report.md."""
    src = Path(path)
    if (src / "trials.parquet").is_file():
        kind = "sweep"
    elif (src / "rounds.parquet").is_file():
        kind = "run"
    else:
        raise ConfigError(f"raysim report: {src} is neither a run directory (rounds.parquet) "
                          "nor a sweep directory (trials.parquet)")
    dest = Path(out) if out else src / "report"
    dest.mkdir(parents=True, exist_ok=True)
    return sweep_report(src, dest) if kind == "sweep" else run_report(src, dest)


# ----------------------------------------------------------------------------------------- one run


def run_report(run_dir: Path, dest: Path) -> Path:
    import pandas as pd

    rounds = pd.read_parquet(run_dir / "rounds.parquet").sort_values("round")
    summary = _read_json(run_dir / "summary.json")
    cfg = _read_yaml(run_dir / "config.yaml")
    plt = _plt()
    pngs = []

    pngs.append(_round_plot(rounds, [("accuracy", "global accuracy"), ("personalized_accuracy", "personalised accuracy")],
                            "accuracy", "Test accuracy", dest / "accuracy.png", plt))
    pngs.append(_round_plot(rounds, [("loss", "test loss"), ("train_loss", "train loss (clients)")],
                            "loss", "Loss", dest / "loss.png", plt))
    if "deviation_rel" in rounds and rounds["deviation_rel"].notna().any():
        pngs.append(_round_plot(rounds.assign(deviation_rel=rounds["deviation_rel"].clip(lower=1e-16)),
                                [("deviation_rel", "deviation_rel")], "deviation_rel (log)",
                                "Aggregation deviation ‖ideal − applied‖ / ‖ideal‖", dest / "deviation.png", plt,
                                log=True))

    name = (summary or {}).get("name") or cfg.get("name") or run_dir.name
    lines = [f"# Run report: {name}", ""]
    status = (summary or {}).get("status", "incomplete (no summary.json: interrupted or still running)")
    lines += [f"- directory: `{run_dir}`", f"- status: {status}"]
    lines += [f"- {k}: {v}" for k, v in _config_facts(cfg).items()]
    last = rounds.iloc[-1]
    acc = rounds.dropna(subset=["accuracy"])
    best = acc.loc[acc["accuracy"].idxmax()] if len(acc) else None
    lines += ["", "## Results", "", "| metric | value |", "|---|---|",
              f"| rounds done | {int(last['round'])} |",
              f"| final accuracy | {_f(acc['accuracy'].iloc[-1] if len(acc) else None)} |",
              f"| best accuracy (round) | {_f(None if best is None else best['accuracy'])}"
              f" ({'-' if best is None else int(best['round'])}) |",
              f"| final loss | {_f(last.get('loss'))} |",
              f"| final deviation_rel | {_f(last.get('deviation_rel'), sci=True)} |",
              f"| bytes up / down (total) | {_bytes(rounds['bytes_up'].sum())} / {_bytes(rounds['bytes_down'].sum())} |",
              f"| clients completed / failed | {int(rounds['clients_completed'].sum())} / "
              f"{int(rounds['clients_failed'].sum())} |",
              f"| simulated wall time | {_f(last.get('wall_s'))} s |", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    lines += ["", "## Per round", "",
              "| round | accuracy | loss | deviation_rel | bytes up | bytes down | clients ok/sampled | round s |",
              "|---|---|---|---|---|---|---|---|"]
    for _, r in rounds.iterrows():
        lines.append(f"| {int(r['round'])} | {_f(r['accuracy'])} | {_f(r['loss'])} | {_f(r['deviation_rel'], sci=True)}"
                     f" | {_bytes(r['bytes_up'])} | {_bytes(r['bytes_down'])} | {int(r['clients_completed'])}/"
                     f"{int(r['clients_sampled'])} | {_f(r['round_time_s'], digits=2)} |")
    report = dest / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


# ----------------------------------------------------------------------------------------- a sweep


def sweep_report(sweep_dir: Path, dest: Path) -> Path:
    import pandas as pd

    df = pd.read_parquet(sweep_dir / "trials.parquet")
    spec = _read_yaml(sweep_dir / "sweep.yaml")
    dims = swept_dims(df, spec)
    done = df[df["status"] == "completed"]
    base = spec.get("base") or {}
    base_agg = (base.get("aggregator") or {}).get("name", "fedit") if isinstance(base, dict) else "fedit"
    plt = _plt()
    pngs: list[Path] = []

    for dim in dims:
        if dim == AGG:
            continue
        fname, label, logx = KNOWN_DIMS.get(dim, (f"accuracy_vs_{_slug(dim)}.png", dim, False))
        fig = _accuracy_vs(done, dim, label, logx, base_agg, plt)
        if fig is not None:
            pngs.append(_save(fig, dest / fname, plt))
    if AGG in dims and "deviation_rel" in done and done["deviation_rel"].notna().any():
        pngs.append(_save(_deviation_bars(done, plt), dest / "deviation_per_aggregator.png", plt))
    curves = _curves(df, sweep_dir, base_agg, dims, plt)
    if curves is not None:
        pngs.append(_save(curves, dest / "accuracy_curves.png", plt))

    name = spec.get("name") or sweep_dir.name
    counts = df["status"].value_counts().to_dict()
    lines = [f"# Sweep report: {name}", ""]
    if spec.get("description"):
        lines += [str(spec["description"]).strip(), ""]
    lines += [f"- directory: `{sweep_dir}`",
              f"- trials: {len(df)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})",
              f"- metric: {spec.get('metric', 'accuracy')} ({spec.get('mode', 'max')})"
              + (f", scheduler: ASHA (grace {spec['scheduler'].get('grace_period')} rounds, reduction factor "
                 f"{spec['scheduler'].get('reduction_factor')})" if spec.get("scheduler") else "")]
    if isinstance(base, dict):
        lines += [f"- base {k}: {v}" for k, v in _config_facts(base).items()]
    for dim in dims:
        lines.append(f"- swept `{dim}`: {', '.join(_v(v) for v in _sorted_unique(df[dim]))}")
    if "seed" in df:
        lines.append(f"- seeds: {', '.join(str(int(s)) for s in _sorted_unique(df['seed']))}")
    lines += ["", "## Results (final values of completed trials, mean ± std over seeds)", ""]
    lines += _group_table(df, dims)
    if len(done):
        best = done.loc[done["accuracy"].idxmax()] if done["accuracy"].notna().any() else None
        if best is not None:
            lines += ["", f"Best trial: `{best['trial']}` — final accuracy {_f(best['accuracy'])}, "
                          f"best accuracy {_f(best['best_accuracy'])} (round {_v(best['best_round'])})."]
    if (df["status"] == "stopped").any():
        lines += ["", "Trials stopped early by ASHA are not in the means above; the per-trial table lists them."]
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" + "\n" for p in pngs]
    lines += ["", "## Trials", "", "| trial | " + " | ".join(dims) + " | seed | status | rounds | accuracy | "
              "best accuracy | deviation_rel | bytes up |",
              "|---|" + "---|" * (len(dims) + 7)]
    for _, r in df.sort_values("trial").iterrows():
        lines.append(f"| {r['trial']} | " + " | ".join(_v(r[d]) for d in dims)
                     + f" | {_v(r.get('seed'))} | {r['status']} | {_v(r.get('rounds_done'))} | {_f(r.get('accuracy'))}"
                     f" | {_f(r.get('best_accuracy'))} | {_f(r.get('deviation_rel'), sci=True)}"
                     f" | {_bytes(r.get('bytes_up'))} |")
    report = dest / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def swept_dims(df, spec: dict[str, Any]) -> list[str]:
    """Swept keys other than the seed: from sweep.yaml when present, else the non-result columns."""
    from raysim.tune import RESULT_COLUMNS

    keys = list((spec.get("search_space") or {}).keys())
    if not keys:
        keys = [c for c in df.columns if c not in NON_DIMS and c not in RESULT_COLUMNS]
    return [k for k in keys if k in df.columns and k != "seed"]


def _group_table(df, dims: list[str]) -> list[str]:
    metrics = [("accuracy", "accuracy", False), ("best_accuracy", "best accuracy", False),
               ("deviation_rel", "deviation_rel", True), ("loss", "loss", False)]
    header = "| " + " | ".join(dims + ["n", *(m[1] for m in metrics), "bytes up"]) + " |"
    lines = [header, "|" + "---|" * (len(dims) + len(metrics) + 2)]
    groups = df.groupby(dims, dropna=False, sort=True) if dims else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        done = g[g["status"] == "completed"]
        n = f"{len(done)}/{len(g)}"
        cells = [_v(k) for k in key] + [n]
        for col, _, sci in metrics:
            cells.append(_mean_std(done[col] if col in done else [], sci))
        cells.append(_bytes(done["bytes_up"].mean()) if len(done) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


MARKERS = "osD^vP*X"
ALPHA = "data.partition.alpha"


def _styles(aggs: list) -> dict:
    """One colour and marker per aggregator, the same in every plot of a report."""
    return {a: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]} for i, a in enumerate(sorted(aggs, key=str))}


def _accuracy_vs(done, dim: str, label: str, logx: bool, base_agg: str, plt):
    data = done.dropna(subset=["accuracy"])
    if not len(data):
        return None
    xs_all = _sorted_unique(data[dim])
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    positions = {x: (x if numeric else i) for i, x in enumerate(xs_all)}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
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
    if numeric:
        ax.set_xticks(xs_all)
        ax.set_xticklabels([_v(x) for x in xs_all])
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(xs_all)))
        ax.set_xticklabels([_v(x) for x in xs_all])
    ax.set(xlabel=label, ylabel="final test accuracy",
           title=f"Final accuracy vs {dim} (mean ± std over seeds and other swept keys)")
    ax.title.set_fontsize(9)
    ax.legend(title="aggregator", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _deviation_bars(done, plt):
    """Final deviation_rel per aggregator (log scale); bars grouped by non-IID alpha when it was swept."""
    import numpy as np

    data = done.dropna(subset=["deviation_rel"])
    aggs = sorted(data[AGG].unique(), key=str)
    groups = _sorted_unique(data[ALPHA]) if ALPHA in data else [None]
    positive = data["deviation_rel"][data["deviation_rel"] > 0]
    floor = max(1e-16, float(positive.min()) / 100) if len(positive) else 1e-16
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    width = 0.8 / len(groups)
    for j, alpha in enumerate(groups):
        sub = data if alpha is None else data[data[ALPHA] == alpha]
        stats = sub.groupby(AGG)["deviation_rel"].agg(["mean", "std"]).reindex(aggs)
        x = np.arange(len(aggs)) + (j - (len(groups) - 1) / 2) * width
        means = stats["mean"].fillna(floor).clip(lower=floor)
        ax.bar(x, means, width=width, yerr=stats["std"].fillna(0.0), capsize=2,
               label=None if alpha is None else f"alpha {_v(alpha)}", color=f"C{j + 1}")
        for xi, v, m in zip(x, stats["mean"], means):
            ax.annotate("-" if v != v else f"{v:.0e}", (xi, float(m)), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(aggs)))
    ax.set_xticklabels([str(a) for a in aggs])
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    if groups != [None]:
        ax.legend(title="non-IID level", fontsize=8)
    ax.set(xlabel="aggregator", ylabel="final deviation_rel (log)",
           title="Aggregation deviation ‖ideal − applied‖/‖ideal‖ (mean ± std over trials)")
    ax.title.set_fontsize(9)
    return fig


def _curves(df, sweep_dir: Path, base_agg: str, dims: list[str], plt):
    """Mean test accuracy per round for each aggregator (and non-IID level when swept), all trials —
    including those ASHA stopped."""
    import pandas as pd

    frames = []
    for _, r in df.iterrows():
        run_dir = Path(str(r.get("run_dir") or ""))
        if not (run_dir / "rounds.parquet").is_file():
            run_dir = sweep_dir / "trials" / str(r["trial"])      # the sweep dir moved
        if not (run_dir / "rounds.parquet").is_file():
            continue
        rounds = pd.read_parquet(run_dir / "rounds.parquet", columns=["round", "accuracy"])
        rounds["agg"] = r[AGG] if AGG in df.columns else base_agg
        rounds["alpha"] = r[ALPHA] if ALPHA in dims else None
        frames.append(rounds)
    if not frames:
        return None
    allr = pd.concat(frames).dropna(subset=["accuracy"])
    if not len(allr):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = _styles(list(allr["agg"].unique()))
    alphas = _sorted_unique(allr["alpha"]) if ALPHA in dims else [None]
    lines = ["-", "--", ":", "-."]
    for agg in sorted(allr["agg"].unique(), key=str):
        for k, alpha in enumerate(alphas):
            g = allr[allr["agg"] == agg] if alpha is None else allr[(allr["agg"] == agg) & (allr["alpha"] == alpha)]
            if not len(g):
                continue
            s = g.groupby("round")["accuracy"].agg(["mean", "std"]).reset_index()
            label = str(agg) if alpha is None else f"{agg}, alpha {_v(alpha)}"
            ax.plot(s["round"], s["mean"], linestyle=lines[k % len(lines)], label=label, alpha=0.85,
                    markerfacecolor="none", **styles[agg])
            ax.fill_between(s["round"], s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                            alpha=0.08, color=styles[agg]["color"])
    _integer_x(ax)
    ax.set(xlabel="round", ylabel="test accuracy",
           title="Accuracy per round (mean ± std over seeds and other swept keys)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------- helpers


def _config_facts(cfg: dict[str, Any]) -> dict[str, str]:
    if not cfg:
        return {}
    g = lambda *ks, d=None: _dig(cfg, ks, d)  # noqa: E731
    part = g("data", "partition", d={}) or {}
    part_s = ", ".join(f"{k}={v}" for k, v in part.items()) if isinstance(part, dict) else str(part)
    return {
        "model": str(g("model", "name", d="embedded:minilm-l6")),
        "data": f"{g('data', 'source', d='embedded:bbc-news')} ({part_s or 'default partition'})",
        "federation": f"{g('federation', 'num_clients', d=20)} clients, {g('federation', 'clients_per_round', d=5)} "
                      f"per round, {g('federation', 'rounds', d=10)} rounds",
        "training": f"{g('train', 'local_steps', d=10)} local steps, batch {g('train', 'batch_size', d=16)}, "
                    f"lr {g('train', 'lr', d=5e-4)}",
        "LoRA": f"rank {_v(g('lora', 'rank', d=8))}, alpha {g('lora', 'alpha', d=16)}",
        "aggregator": str(g("aggregator", "name", d="fedit")),
    }


def _dig(d: Any, keys: tuple, default: Any) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _round_plot(rounds, series: list[tuple[str, str]], ylabel: str, title: str, path: Path, plt,
                log: bool = False) -> Path:
    """One PNG of per-round columns (those present and not all null)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in series:
        if col in rounds and rounds[col].notna().any():
            _line(ax, rounds, col, label)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.legend()
    return _save(fig, path, plt)


def _line(ax, df, col: str, label: str) -> None:
    d = df.dropna(subset=[col])
    if len(d):
        ax.plot(d["round"], d[col], marker="o", label=label)
    _integer_x(ax)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _sorted_unique(series) -> list:
    vals = [v.item() if hasattr(v, "item") else v for v in series.dropna().unique()]
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _v(v: Any) -> str:
    if hasattr(v, "item"):
        v = v.item()
    if _is_missing(v):
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _f(v: Any, sci: bool = False, digits: int = 4) -> str:
    if hasattr(v, "item"):
        v = v.item()
    if _is_missing(v):
        return "-"
    return f"{float(v):.2e}" if sci else f"{float(v):.{digits}f}"


def _mean_std(values, sci: bool) -> str:
    vals = [float(v) for v in values if not _is_missing(v.item() if hasattr(v, "item") else v)]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return _f(mean, sci)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{_f(mean, sci)} ± {_f(std, sci)}"


def _bytes(n: Any) -> str:
    if hasattr(n, "item"):
        n = n.item()
    if _is_missing(n):
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------------------- CLI


def cmd_report(args) -> int:
    report = make_report(args.dir, args.out)
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    print(f"report: {report}" + (f"  ({', '.join(pngs)})" if pngs else ""))
    return 0


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser("report", help="plots + markdown summary of a run or sweep directory")
    p.add_argument("dir", help="a run directory (rounds.parquet) or a sweep directory (trials.parquet)")
    p.add_argument("--out", metavar="DIR", help="where to write report.md and the PNGs (default DIR/report)")
    p.set_defaults(func=cmd_report)
