"""Markdown pieces shared by the reports: the config facts and the tables of a sweep."""

from __future__ import annotations

from typing import Any

from raysim.report.fmt import byte_unit, fmt_bytes, fmt_float, fmt_mean_std, fmt_value
from raysim.report.load import config_value

# final-value columns of a sweep: (column, header, scientific notation)
METRICS = [("accuracy", "accuracy", False), ("best_accuracy", "best accuracy", False),
           ("deviation_rel", "deviation_rel", True), ("loss", "loss", False)]


def config_facts(cfg: dict[str, Any]) -> dict[str, str]:
    """One line per part of a (possibly partial) config; what it leaves out is the ExperimentConfig default."""
    if not cfg:
        return {}
    g = lambda *keys: config_value(cfg, *keys)  # noqa: E731
    part = g("data", "partition")
    part_s = ", ".join(f"{k}={v}" for k, v in part.items()) if isinstance(part, dict) else str(part)
    return {
        "model": str(g("model", "name")),
        "data": f"{g('data', 'source')} ({part_s or 'default partition'})",
        "federation": f"{g('federation', 'num_clients')} clients, {g('federation', 'clients_per_round')} "
                      f"per round, {g('federation', 'rounds')} rounds",
        "training": f"{g('train', 'local_steps')} local steps, batch {g('train', 'batch_size')}, "
                    f"lr {g('train', 'lr')}",
        "LoRA": f"rank {fmt_value(g('lora', 'rank'))}, alpha {g('lora', 'alpha')}",
        "aggregator": str(g("aggregator", "name")),
    }


def group_table(df, dims: list[str]) -> list[str]:
    """Per combination of swept values: completed/all trials and mean ± std of the final metrics."""
    header = "| " + " | ".join(dims + ["n", *(m[1] for m in METRICS), "bytes up"]) + " |"
    lines = [header, "|" + "---|" * (len(dims) + len(METRICS) + 2)]
    groups = df.groupby(dims, dropna=False, sort=True) if dims else [((), df)]
    unit = byte_unit(df.loc[df["status"] == "completed", "bytes_up"])
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        done = g[g["status"] == "completed"]
        cells = [fmt_value(k) for k in key] + [f"{len(done)}/{len(g)}"]
        for col, _, sci in METRICS:
            cells.append(fmt_mean_std(done[col] if col in done else [], sci))
        cells.append(fmt_bytes(done["bytes_up"].mean(), unit) if len(done) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def trials_table(df, dims: list[str]) -> list[str]:
    """One row per trial, sorted by trial name."""
    lines = ["| trial | " + " | ".join(dims) + " | seed | status | rounds | accuracy | "
             "best accuracy | deviation_rel | bytes up |",
             "|---|" + "---|" * (len(dims) + 7)]
    unit = byte_unit(df["bytes_up"])
    for _, r in df.sort_values("trial").iterrows():
        lines.append(f"| {r['trial']} | " + " | ".join(fmt_value(r[d]) for d in dims)
                     + f" | {fmt_value(r.get('seed'))} | {r['status']} | {fmt_value(r.get('rounds_done'))}"
                     f" | {fmt_float(r.get('accuracy'))} | {fmt_float(r.get('best_accuracy'))}"
                     f" | {fmt_float(r.get('deviation_rel'), sci=True)} | {fmt_bytes(r.get('bytes_up'), unit)} |")
    return lines
