"""The report of one run directory: accuracy, loss and deviation curves, final and best metrics,
totals and the per-round table."""

from __future__ import annotations

from pathlib import Path

from raysim.config import ConfigError
from raysim.report.fmt import byte_unit, fmt_bytes, fmt_float, fmt_seconds
from raysim.report.load import base_name, config_value, read_json, read_yaml, rounds_frame
from raysim.report.plots import ACCURACY_LABEL, DEVIATION_LABEL, round_plot
from raysim.report.tables import config_facts
from raysim.storage import RunStorage


def run_report(run: RunStorage, dest: Path) -> Path:
    """report.md and the PNGs of run directory `run` (local or a URI), written into the local folder `dest`."""
    rounds = rounds_frame(run)
    if not len(rounds):
        raise ConfigError(f"raysim report: {run.uri()} has no rounds yet (rounds.parquet is empty)")
    summary = read_json(run, "summary.json")
    cfg = read_yaml(run, "config.yaml")
    pngs = _run_plots(rounds, dest, str(config_value(cfg, "task", "type")))
    name = summary.get("name") or cfg.get("name") or base_name(run)
    status = summary.get("status", "incomplete (no summary.json: interrupted or still running)")
    lines = [f"# Run report: {name}", "", f"- directory: `{run.uri()}`", f"- status: {status}"]
    lines += [f"- {k}: {v}" for k, v in config_facts(cfg).items()]
    lines += ["", "## Results", ""] + _results_table(rounds) + [""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    lines += ["", "## Per round", ""] + _per_round_table(rounds)
    report = dest / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


# the loss of each task type, with its unit (the y-axis of loss.png)
LOSS_LABELS = {"regression": "mean squared error (label units²)",
               "causal_lm": "cross-entropy (nats per response token)"}
DEFAULT_LOSS_LABEL = "cross-entropy (nats per example)"


def _run_plots(rounds, dest: Path, task: str) -> list[Path]:
    pngs = [round_plot(rounds, [("accuracy", "global accuracy"), ("personalized_accuracy", "personalised accuracy"),
                                ("exact_match", "exact match (greedy generation)")],
                       ACCURACY_LABEL, "Test accuracy", dest / "accuracy.png"),
            round_plot(rounds, [("loss", "test loss"), ("train_loss", "train loss (clients)")],
                       LOSS_LABELS.get(task, DEFAULT_LOSS_LABEL), "Loss", dest / "loss.png")]
    if "deviation_rel" in rounds and rounds["deviation_rel"].notna().any():
        pngs.append(round_plot(rounds.assign(deviation_rel=rounds["deviation_rel"].clip(lower=1e-16)),
                               [("deviation_rel", "deviation_rel")], DEVIATION_LABEL,
                               "Aggregation deviation ‖ideal − applied‖ / ‖ideal‖", dest / "deviation.png",
                               log=True))
    return pngs


def _results_table(rounds) -> list[str]:
    from raysim.metrics import summarise_rounds

    s = summarise_rounds(rounds.astype(object).where(rounds.notna(), None).to_dict("records"))
    best, final, totals = s["best"], s["final"], s["totals"]
    unit = byte_unit([totals["bytes_up"], totals["bytes_down"]])
    return ["| metric | value |", "|---|---|",
            f"| rounds done | {int(rounds['round'].iloc[-1])} |",
            f"| final accuracy | {fmt_float(s['last_evaluated']['accuracy'])} |",
            f"| best accuracy (round) | {fmt_float(best['accuracy'])}"
            f" ({'-' if best['round'] is None else int(best['round'])}) |",
            f"| final loss | {fmt_float(final['loss'])} |",
            f"| final deviation_rel | {fmt_float(final['deviation_rel'], sci=True)} |",
            f"| bytes up / down (total) | {fmt_bytes(totals['bytes_up'], unit)} / "
            f"{fmt_bytes(totals['bytes_down'], unit)} |",
            f"| clients completed / failed | {totals['clients_completed']} / {totals['clients_failed']} |",
            f"| simulated wall time | {fmt_seconds(s['wall_s'])} |"]


def _per_round_table(rounds) -> list[str]:
    unit = byte_unit(list(rounds["bytes_up"]) + list(rounds["bytes_down"]))
    lines = ["| round | accuracy | loss | deviation_rel | bytes up | bytes down | clients ok/sampled | round time |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in rounds.iterrows():
        lines.append(f"| {int(r['round'])} | {fmt_float(r['accuracy'])} | {fmt_float(r['loss'])} | "
                     f"{fmt_float(r['deviation_rel'], sci=True)} | {fmt_bytes(r['bytes_up'], unit)} | "
                     f"{fmt_bytes(r['bytes_down'], unit)} | "
                     f"{int(r['clients_completed'])}/{int(r['clients_sampled'])} | "
                     f"{fmt_seconds(r['round_time_s'])} |")
    return lines
