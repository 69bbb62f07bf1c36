"""`raysim report`: PNGs and report.md from run and sweep directories (no Ray: the inputs are written
here in the formats raysim.metrics and raysim.tune produce)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysim.cli import main
from raysim.config import ConfigError, ExperimentConfig
from raysim.metrics import RunWriter
from raysim.report import make_report

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, accs, aggregator="fedit", summary=True) -> Path:
    """A run directory as raysim.metrics writes it (rounds/clients parquet, config, summary)."""
    writer = RunWriter(run_dir)
    writer.write_config({"name": "r", "seed": 0, "model": {"name": "random:bert-tiny"},
                         "federation": {"num_clients": 8, "clients_per_round": 4, "rounds": len(accs)},
                         "aggregator": {"name": aggregator}})
    for i, acc in enumerate(accs, start=1):
        row = {"round": i, "wall_s": float(i), "round_time_s": 0.5, "accuracy": acc, "loss": 2.0 - acc,
               "personalized_accuracy": None, "deviation_rel": 0.1 / i if aggregator == "fedit" else 1e-8,
               "deviation_rel_round": None, "bytes_up": 1000, "bytes_down": 2000, "clients_sampled": 4,
               "clients_completed": 4, "clients_failed": 0, "train_loss": 1.5, "aggregator": aggregator}
        writer.add_round(row, [])
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "name": "r"}))
    return run_dir


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_run_report_has_curves_and_the_final_and_best_metrics(tmp_path):
    run = write_run(tmp_path / "run", [0.3, 0.6, 0.5])
    report = make_report(run)
    assert report == run / "report" / "report.md"
    for name in ("accuracy.png", "loss.png", "deviation.png"):
        assert is_png(run / "report" / name), name
    text = report.read_text()
    assert "| final accuracy | 0.5000 |" in text
    assert "| best accuracy (round) | 0.6000 (2) |" in text
    assert "| bytes up / down (total) | 3.0 KB / 6.0 KB |" in text
    assert "status: completed" in text
    assert sum(line.startswith("| 3 | 0.5000") for line in text.splitlines()) == 1   # per-round table
    assert "![accuracy](accuracy.png)" in text


def test_report_of_an_unfinished_run_says_so(tmp_path):
    run = write_run(tmp_path / "run", [0.3], summary=False)
    text = make_report(run, tmp_path / "out").read_text()
    assert "incomplete" in text and is_png(tmp_path / "out" / "accuracy.png")


def make_sweep(tmp_path: Path, space: dict[str, list], acc_of, stopped=()) -> Path:
    """A sweep directory as raysim.tune writes it: sweep.yaml, trials.parquet, trials/<name>/."""
    sweep = tmp_path / "sweep"
    (sweep / "trials").mkdir(parents=True)
    (sweep / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "s", "base": {"model": {"name": "random:bert-tiny"}, "aggregator": {"name": "fedit"}},
        "search_space": {k: {"grid_search": v} for k, v in space.items()}, "seeds": [0, 1], "metric": "accuracy",
        "mode": "max"}, sort_keys=False))
    rows = []
    keys = list(space)
    for i, values in enumerate(itertools.product(*space.values(), [0, 1])):
        point = dict(zip(keys + ["seed"], values))
        name = f"{i:04d}"
        acc = acc_of(point)
        run = write_run(sweep / "trials" / name, [acc / 2, acc], aggregator=point.get("aggregator.name", "fedit"))
        rows.append({"trial": name, "trial_id": f"x_{i:05d}", **point,
                     "status": "stopped" if i in stopped else "completed", "rounds_done": 2, "rounds": 2,
                     "accuracy": acc, "loss": 1.0, "deviation_rel": 0.1 if point.get("aggregator.name") == "fedit"
                     else 1e-8, "best_accuracy": acc, "best_round": 2, "bytes_up": 2000, "bytes_down": 4000,
                     "run_dir": str(run)})
    pd.DataFrame(rows).to_parquet(sweep / "trials.parquet", index=False)
    return sweep


def test_sweep_report_plots_each_swept_dimension_and_tables_mean_std_over_seeds(tmp_path):
    space = {"aggregator.name": ["fedit", "fedex"], "data.partition.alpha": [0.1, 100.0],
             "lora.rank": [4, 8], "federation.num_clients": [10, 50]}

    def acc(p):
        return (0.5 + 0.2 * (p["aggregator.name"] == "fedex") + 0.1 * (p["data.partition.alpha"] > 1)
                + 0.01 * p["lora.rank"] / 4 + 0.05 * p["seed"])
    sweep = make_sweep(tmp_path, space, acc, stopped={1})         # trial 1: fedit 0.1 4 10, seed 1
    report = make_report(sweep)
    out = sweep / "report"
    for name in ("accuracy_vs_alpha.png", "accuracy_vs_rank.png", "accuracy_vs_clients.png",
                 "deviation_per_aggregator.png", "accuracy_curves.png"):
        assert is_png(out / name), name
    text = report.read_text()
    assert "| aggregator.name | data.partition.alpha | lora.rank | federation.num_clients | n | accuracy |" in text
    # fedex, alpha 100, rank 8, 10 clients: seeds 0 and 1 -> 0.82 and 0.87
    mean, std = (0.82 + 0.87) / 2, math.sqrt(2 * 0.025 ** 2)
    assert f"| fedex | 100 | 8 | 10 | 2/2 | {mean:.4f} ± {std:.4f} |" in text
    # the trial ASHA stopped is left out of the mean: only seed 0 (0.51) remains
    assert "| fedit | 0.1 | 4 | 10 | 1/2 | 0.5100 |" in text
    assert "stopped early by ASHA" in text
    assert "Best trial: `" in text and "(32 completed)" not in text and "31 completed, 1 stopped" in text
    assert "![accuracy_vs_alpha](accuracy_vs_alpha.png)" in text


def test_sweep_report_draws_only_the_dimensions_that_were_swept(tmp_path):
    sweep = make_sweep(tmp_path, {"train.lr": [1e-4, 1e-3]}, lambda p: 0.4 + 100 * p["train.lr"] + 0.05 * p["seed"])
    make_report(sweep, tmp_path / "rep")
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["accuracy_curves.png", "accuracy_vs_train_lr.png"]
    text = (tmp_path / "rep" / "report.md").read_text()
    std = math.sqrt(2 * 0.025 ** 2)                               # seeds add 0 and 0.05
    assert "| train.lr | n | accuracy |" in text and f"| 0.001 | 2/2 | 0.5250 ± {std:.4f} |" in text


def test_report_rejects_a_directory_that_is_neither(tmp_path, capsys):
    with pytest.raises(ConfigError, match="neither a run directory"):
        make_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_facts_a_sweep_base_leaves_out_are_the_config_defaults(tmp_path):
    sweep = make_sweep(tmp_path, {"train.lr": [1e-3]}, lambda p: 0.5)       # base: model and aggregator only
    text = make_report(sweep).read_text()
    d = ExperimentConfig()
    part = ", ".join(f"{k}={v}" for k, v in d.data.partition.model_dump(mode="json").items())
    assert "- base model: random:bert-tiny" in text and "- base aggregator: fedit" in text
    assert f"- base data: {d.data.source} ({part})" in text
    assert (f"- base federation: {d.federation.num_clients} clients, {d.federation.clients_per_round} per round, "
            f"{d.federation.rounds} rounds") in text
    assert f"- base training: {d.train.local_steps} local steps, batch {d.train.batch_size}, lr {d.train.lr}" in text
    assert f"- base LoRA: rank {d.lora.rank}, alpha {d.lora.alpha}" in text
