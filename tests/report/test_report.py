"""`raysim report`: PNGs and report.md from run and sweep directories (no Ray: the inputs are written
here in the formats raysim.metrics and raysim.tune produce)."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

from conftest_s3 import s3_server  # noqa: F401 - the fixture
from raysim.cli import main
from raysim.config import ConfigError, ExperimentConfig
from raysim.metrics import RunWriter
from raysim.report import make_report
from raysim.storage import RunStorage

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, accs, aggregator="fedit", summary=True):
    """A run directory (a path or a URI) as raysim.metrics writes it (rounds/clients parquet, config, summary)."""
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
        writer.storage.write_text("summary.json", json.dumps({"status": "completed", "name": "r"}))
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
    assert "| final accuracy | 0.500 |" in text
    assert "| best accuracy (round) | 0.600 (2) |" in text
    assert "| bytes up / down (total) | 3.00 KB / 6.00 KB |" in text
    assert "| simulated wall time | 3.0 s |" in text
    assert "status: completed" in text
    assert sum(line.startswith("| 3 | 0.500 |") for line in text.splitlines()) == 1   # per-round table
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
    assert f"| fedex | 100 | 8 | 10 | 2/2 | {mean:.3f} ± {std:.3f} |" in text
    # the trial ASHA stopped is left out of the mean: only seed 0 (0.51) remains
    assert "| fedit | 0.1 | 4 | 10 | 1/2 | 0.510 |" in text
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
    assert "| train.lr | n | accuracy |" in text and f"| 0.001 | 2/2 | {(0.5 + 0.55) / 2:.3f} ± {std:.3f} |" in text


def upload(local: Path, uri: str) -> None:
    """Copy a local directory tree into the object store at `uri`."""
    dest = RunStorage.of(uri)
    pafs.copy_files(str(local), dest.path(), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)


def test_reports_of_directories_in_an_object_store(s3_server, tmp_path, capsys):  # noqa: F811 - the fixture
    """A run and a sweep read from S3 give the same report as from local disk; the output goes to a local
    folder (--out) or, by default, next to the source in the bucket."""
    run_uri = s3_server.uri()
    write_run(run_uri, [0.3, 0.6, 0.5])
    local_run = write_run(tmp_path / "run", [0.3, 0.6, 0.5])
    from_s3 = make_report(run_uri, tmp_path / "run-from-s3").read_text()
    local = make_report(local_run).read_text()
    directory = re.compile(r"^- directory: .*$", re.M)
    assert directory.sub("", from_s3) == directory.sub("", local)
    assert f"- directory: `{RunStorage.of(run_uri).uri()}`" in from_s3

    sweep = make_sweep(tmp_path, {"aggregator.name": ["fedit", "fedex"]},
                       lambda p: 0.5 + 0.1 * (p["aggregator.name"] == "fedex") + 0.05 * p["seed"])
    local = make_report(sweep, tmp_path / "local-report").read_text()
    sweep_uri = s3_server.uri()
    upload(sweep, sweep_uri)
    shutil.rmtree(sweep)           # trials.parquet's run_dir paths are gone: the trials are read from the bucket
    assert main(["report", sweep_uri]) == 0
    assert capsys.readouterr().out.startswith(f"report: {RunStorage.of(sweep_uri).uri('report/report.md')}")
    in_bucket = RunStorage.of(sweep_uri).child("report")
    assert in_bucket.listdir() == ["accuracy_curves.png", "deviation_per_aggregator.png", "report.md"]
    assert directory.sub("", in_bucket.read_text("report.md")) == directory.sub("", local)
    assert in_bucket.read_bytes("accuracy_curves.png")[:8] == PNG


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


def test_human_numbers_are_rounded_and_bytes_share_one_unit_per_column(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"name": "r", "seed": 0})
    for i, (up, wall) in enumerate([(900, 50.21), (1_513_060, 101.4), (7_411_300, 151.7138)], start=1):
        writer.add_round({"round": i, "wall_s": wall, "round_time_s": 25.2371, "accuracy": 0.91234, "loss": 0.31,
                          "bytes_up": up, "bytes_down": up, "clients_sampled": 5, "clients_completed": 5,
                          "clients_failed": 0, "aggregator": "fedit"}, [])
    text = make_report(tmp_path / "run").read_text()
    assert "| simulated wall time | 151.7 s |" in text and "151.71" not in text
    assert "| bytes up / down (total) | 8.93 MB / 8.93 MB |" in text
    rows = [line.split(" | ") for line in text.splitlines() if line[:4] in ("| 1 ", "| 2 ", "| 3 ")]
    assert [r[4] for r in rows] == ["0.001 MB", "1.51 MB", "7.41 MB"]          # never B next to MB
    assert [r[1] for r in rows] == ["0.912"] * 3 and {r[7] for r in rows} == {"25.2 s |"}


def test_byte_and_time_formats():
    from raysim.report.fmt import byte_unit, fmt_bytes, fmt_seconds

    assert [byte_unit(v) for v in ([999], [999, 1000], [775_780, 1_513_060], [2.5e9], [])] == \
        ["B", "KB", "MB", "GB", "B"]
    assert fmt_bytes(1_513_060) == "1.51 MB" and fmt_bytes(775_780, "MB") == "0.776 MB"
    assert fmt_bytes(151_306_000) == "151 MB" and fmt_bytes(2.5e9) == "2.50 GB" and fmt_bytes(512) == "512 B"
    assert fmt_bytes(None) == "-" and fmt_seconds(151.7138) == "151.7 s" and fmt_seconds(float("nan")) == "-"


@pytest.mark.parametrize("task, loss_unit", [("seq_cls", "nats per example"), ("regression", "label units²"),
                                             ("causal_lm", "nats per response token")])
def test_every_plot_axis_has_a_unit(tmp_path, monkeypatch, task, loss_unit):
    from raysim.report import plots

    labels, save = {}, plots.save

    def record(fig, path):
        labels[path.name] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return save(fig, path)
    monkeypatch.setattr(plots, "save", record)
    run = write_run(tmp_path / "run", [0.3, 0.6])
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "task": {"type": task}}))
    make_report(run)
    space = {"aggregator.name": ["fedit", "fedex"], "data.partition.alpha": [0.1, 100.0], "train.lr": [1e-4, 1e-3]}
    make_report(make_sweep(tmp_path, space, lambda p: 0.5 + 0.05 * p["seed"]))
    assert set(labels) == {"accuracy.png", "loss.png", "deviation.png", "accuracy_vs_alpha.png",
                           "accuracy_vs_train_lr.png", "deviation_per_aggregator.png", "accuracy_curves.png"}
    for name, axes in labels.items():
        for label in (lab for pair in axes for lab in pair):
            assert re.fullmatch(r".+ \(.+\)", label), (name, label)
    assert loss_unit in labels["loss.png"][0][1]
    assert labels["accuracy_vs_train_lr.png"][0][0] == "train.lr (learning rate per step)"
