"""The report of one run directory: accuracy, loss and deviation curves, final and best metrics,
totals and the per-round table."""

from __future__ import annotations

from pathlib import Path

from raysim.report.fmt import fmt_bytes, fmt_float
from raysim.report.load import read_json, read_yaml
from raysim.report.plots import round_plot
from raysim.report.tables import config_facts


def run_report(run_dir: Path, dest: Path) -> Path:
    import pandas as pd

    rounds = pd.read_parquet(run_dir / "rounds.parquet").sort_values("round")
    summary = read_json(run_dir / "summary.json")
    cfg = read_yaml(run_dir / "config.yaml")
    pngs = _run_plots(rounds, dest)
    name = summary.get("name") or cfg.get("name") or run_dir.name
    status = summary.get("status", "incomplete (no summary.json: interrupted or still running)")
    lines = [f"# Run report: {name}", "", f"- directory: `{run_dir}`", f"- status: {status}"]
    lines += [f"- {k}: {v}" for k, v in config_facts(cfg).items()]
    lines += ["", "## Results", ""] + _results_table(rounds) + [""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    lines += ["", "## Per round", ""] + _per_round_table(rounds)
    report = dest / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _run_plots(rounds, dest: Path) -> list[Path]:
    pngs = [round_plot(rounds, [("accuracy", "global accuracy"), ("personalized_accuracy", "personalised accuracy"),
                                ("exact_match", "exact match (greedy generation)")],
                       "accuracy", "Test accuracy", dest / "accuracy.png"),
            round_plot(rounds, [("loss", "test loss"), ("train_loss", "train loss (clients)")],
                       "loss", "Loss", dest / "loss.png")]
    if "deviation_rel" in rounds and rounds["deviation_rel"].notna().any():
        pngs.append(round_plot(rounds.assign(deviation_rel=rounds["deviation_rel"].clip(lower=1e-16)),
                               [("deviation_rel", "deviation_rel")], "deviation_rel (log)",
                               "Aggregation deviation ‖ideal − applied‖ / ‖ideal‖", dest / "deviation.png",
                               log=True))
    return pngs


def _results_table(rounds) -> list[str]:
    from raysim.metrics import summarise_rounds

    s = summarise_rounds(rounds.astype(object).where(rounds.notna(), None).to_dict("records"))
    best, final = s["best"], s["final"]
    return ["| metric | value |", "|---|---|",
            f"| rounds done | {int(rounds['round'].iloc[-1])} |",
            f"| final accuracy | {fmt_float(s['last_evaluated']['accuracy'])} |",
            f"| best accuracy (round) | {fmt_float(best['accuracy'])}"
            f" ({'-' if best['round'] is None else int(best['round'])}) |",
            f"| final loss | {fmt_float(final['loss'])} |",
            f"| final deviation_rel | {fmt_float(final['deviation_rel'], sci=True)} |",
            f"| bytes up / down (total) | {fmt_bytes(s['totals']['bytes_up'])} / {fmt_bytes(s['totals']['bytes_down'])} |",
            f"| clients completed / failed | {s['totals']['clients_completed']} / {s['totals']['clients_failed']} |",
            f"| simulated wall time | {fmt_float(s['wall_s'])} s |"]


def _per_round_table(rounds) -> list[str]:
    lines = ["| round | accuracy | loss | deviation_rel | bytes up | bytes down | clients ok/sampled | round s |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in rounds.iterrows():
        lines.append(f"| {int(r['round'])} | {fmt_float(r['accuracy'])} | {fmt_float(r['loss'])} | "
                     f"{fmt_float(r['deviation_rel'], sci=True)} | {fmt_bytes(r['bytes_up'])} | "
                     f"{fmt_bytes(r['bytes_down'])} | {int(r['clients_completed'])}/{int(r['clients_sampled'])} | "
                     f"{fmt_float(r['round_time_s'], digits=2)} |")
    return lines
