"""The run-directory writer: per-round Parquet parts, schema growth, resume truncation, the summary, on
local disk and on a real S3-compatible server."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import yaml
from conftest_s3 import s3_server  # noqa: F401 - the fixture

from raysim.metrics import RunWriter, read_rounds, summarise_rounds
from raysim.storage import RunStorage


def _row(rnd, acc=None, **extra):
    return {"round": rnd, "wall_s": float(rnd), "round_time_s": 1.0, "accuracy": acc, "loss": None,
            "personalized_accuracy": None, "deviation_rel": 0.1 * rnd, "deviation_rel_round": None,
            "bytes_up": 10, "bytes_down": 20, "clients_sampled": 2, "clients_completed": 2, "clients_failed": 0,
            "train_loss": 1.0, "aggregator": "fedit", **extra}


def _client(rnd, cid):
    return {"round": rnd, "client_id": cid, "worker": 0, "rank": 4, "num_samples": 8, "train_loss": 1.0,
            "train_time_s": 0.1, "bytes_up": 10, "local_accuracy": None, "status": "ok", "noisy": False}


def test_each_round_is_one_file_and_the_tables_read_back_in_order(tmp_path):
    w = RunWriter(tmp_path)
    for rnd in (1, 2, 3):
        w.add_round(_row(rnd, acc=0.5 + rnd / 10), [_client(rnd, 0), _client(rnd, 1)])
        rounds = pd.read_parquet(tmp_path / "rounds.parquet")        # readable while the run goes on
        assert list(rounds["round"]) == list(range(1, rnd + 1))
    assert len(list((tmp_path / "rounds.parquet").glob("round-*.parquet"))) == 3
    assert len(pq.read_table(tmp_path / "clients.parquet")) == 6
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_column_first_seen_later_reaches_every_part(tmp_path):
    w = RunWriter(tmp_path)
    w.add_round(_row(1), [])                                    # e.g. no client completed: no method statistics
    w.add_round(_row(2, agg_stack_rank=8.0), [])
    rounds = pd.read_parquet(tmp_path / "rounds.parquet").sort_values("round")
    assert rounds["agg_stack_rank"].isna().tolist() == [True, False]


def test_resume_forgets_the_rounds_after_the_checkpoint(tmp_path):
    w = RunWriter(tmp_path)
    for rnd in (1, 2, 3):
        w.add_round(_row(rnd), [_client(rnd, 0)])
    again = RunWriter(tmp_path)
    again.load_existing(2)
    assert [r["round"] for r in again.rounds] == [1, 2]
    assert sorted(pd.read_parquet(tmp_path / "clients.parquet")["round"]) == [1, 2]
    again.add_round(_row(3), [_client(3, 0)])
    assert list(pd.read_parquet(tmp_path / "rounds.parquet")["round"]) == [1, 2, 3]


def test_summarise_rounds_takes_final_best_and_totals():
    rows = [_row(1, acc=0.6), _row(2, acc=None), _row(3, acc=0.5)]
    s = summarise_rounds(rows)
    assert s["rounds"] == 3 and s["final"]["accuracy"] == 0.5
    assert s["best"] == {"accuracy": 0.6, "round": 1}
    assert s["totals"]["bytes_up"] == 30 and s["totals"]["bytes_down"] == 60
    assert abs(s["max_deviation_rel"] - 0.3) < 1e-12
    assert summarise_rounds([])["final"]["accuracy"] is None


@pytest.fixture(params=["local", "s3"])
def run_target(request, tmp_path):
    """A run directory on local disk, or on the real S3-compatible test server."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_server").uri()


def test_a_run_directory_round_trips_on_local_disk_and_s3(run_target):
    w = RunWriter(run_target)
    cfg = {"name": "r", "seed": 3, "aggregator": {"name": "fedit"}, "resources": {"num_workers": 1}}
    w.write_config(cfg)
    for rnd in (1, 2, 3):
        extra = {"agg_rank": 4.0} if rnd == 2 else {}
        w.add_round(_row(rnd, acc=rnd / 10, **extra), [_client(rnd, 0), _client(rnd, 1)],
                    [{"round": rnd, "group": "g", "metric": "accuracy", "value": 0.5, "n": 3}],
                    [{"round": rnd, "module": m, "deviation_rel": rnd / 100, "ideal_norm": 2.0} for m in ("q", "v")]
                    if rnd != 2 else [])                                 # round 2: no deviation metric
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    w.write_updates(2, {7: ({"A": a}, {"scale": "2.0"})}, {"A": a * 2})
    w.write_adapter({"adapter_config.json": b"{}"}, {"layer": a})
    summary = w.write_summary(cfg, {"total_s": 1.0}, status="failed")

    storage = RunStorage.of(run_target)
    assert yaml.safe_load(storage.read_text("config.yaml")) == cfg
    assert json.loads(storage.read_text("summary.json"))["status"] == summary["status"] == "failed"
    rounds = read_rounds(run_target)
    assert [r["round"] for r in rounds] == [1, 2, 3] and [r["agg_rank"] for r in rounds] == [None, 4.0, None]
    assert [r["accuracy"] for r in rounds] == [0.1, 0.2, 0.3]
    clients = storage.read_parquet("clients.parquet").to_pylist()
    assert sorted((c["round"], c["client_id"]) for c in clients) == [(r, c) for r in (1, 2, 3) for c in (0, 1)]
    assert len(storage.read_parquet("groups.parquet")) == 3
    modules = storage.read_parquet("modules.parquet").to_pylist()
    assert [(m["round"], m["module"], m["deviation_rel"]) for m in modules] == \
        [(1, "q", 0.01), (1, "v", 0.01), (3, "q", 0.03), (3, "v", 0.03)]
    upload = safetensors.numpy.load(storage.read_bytes("updates/round-0002/client-7.safetensors"))
    assert np.array_equal(upload["A"], a)
    delta = safetensors.numpy.load(storage.read_bytes("adapter/base_delta.safetensors"))
    assert np.array_equal(delta["layer.base_delta"], a)
    assert storage.read_bytes("adapter/adapter_config.json") == b"{}"

    again = RunWriter(run_target)                                   # resume after round 2
    again.load_existing(2)
    assert [r["round"] for r in again.rounds] == [1, 2] and again.rounds[1]["agg_rank"] == 4.0
    assert sorted({c["round"] for c in storage.read_parquet("clients.parquet").to_pylist()}) == [1, 2]
    assert storage.listdir("rounds.parquet") == ["round-000001.parquet", "round-000002.parquet"]
    assert storage.listdir("modules.parquet") == ["round-000001.parquet"]


def test_summary_status_defaults_to_completed_and_is_checked(tmp_path):
    w = RunWriter(tmp_path)
    cfg = {"name": "r", "seed": 0, "aggregator": {"name": "fedit"}, "resources": {}}
    assert w.write_summary(cfg, {})["status"] == "completed"
    assert w.write_summary(cfg, {}, status="running")["status"] == "running"
    with pytest.raises(ValueError, match="summary status"):
        w.write_summary(cfg, {}, status="fine")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "running"   # not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]               # no temporary file


def test_an_unknown_text_column_is_stored_as_text(tmp_path):
    w = RunWriter(tmp_path)
    w.add_round(_row(1), [])
    w.add_round(_row(2, note="late"), [])
    table = pq.read_table(tmp_path / "rounds.parquet")
    assert table.schema.field("note").type == pa.string()
    assert sorted(table.column("note").to_pylist(), key=str) == [None, "late"]


def test_rows_of_parts_written_before_a_column_existed_read_as_nulls(tmp_path):
    """A run directory from before a column was added (or a crash while earlier parts were widened)."""
    w = RunWriter(tmp_path)
    w.add_round(_row(1), [])
    old = pq.read_table(tmp_path / "rounds.parquet" / "round-000001.parquet").drop_columns(["status"])
    pq.write_table(old, tmp_path / "rounds.parquet" / "round-000001.parquet")
    w.add_round(_row(2, status="degraded"), [])
    assert [r["status"] for r in read_rounds(tmp_path)] == [None, "degraded"]
