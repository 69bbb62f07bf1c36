"""The run-directory writer: per-round Parquet parts, schema growth, resume truncation, the summary."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq

from raysim.metrics import RunWriter, summarise_rounds


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
