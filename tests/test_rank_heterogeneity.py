"""End to end: mixed ranks (tiers [2, 8]) with label noise on the tiny config and a local Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raysim.data.noise import noisy_clients
from raysim.dilution import dilution_table, main as dilution_main
from raysim.ranks import assign_ranks
from raysim.runner import run_experiment

pytestmark = pytest.mark.ray


def test_mixed_rank_run_records_ranks_noise_per_rank_bytes_and_stays_exact(ray_local, tiny_config, tmp_path, capsys):
    # FedEx with tiers [2, 8]: the plan/truncation path is the one HetLoRA and replication use too,
    # and the exactness of the residual with mixed ranks is checked end to end
    cfg = tiny_config(**{"aggregator.name": "fedex", "federation.rounds": 2,
                         "lora.rank": "{scheme: tiers, ranks: [2, 8], fractions: [0.5, 0.5]}",
                         "data.label_noise": "{fraction_clients: 0.5, flip_prob: 0.5}",
                         "output.save_updates": "true", "output.checkpoint_every": 0})
    run_experiment(cfg, tmp_path, progress=False)
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert list(rounds["round"]) == [1, 2] and rounds["accuracy"].between(0, 1).all()
    assert (rounds["deviation_rel"] < 1e-5).all()
    assert set(clients["status"]) == {"ok"}
    ranks = assign_ranks(cfg)
    assert set(ranks.values()) == {2, 8}
    assert (clients["rank"] == clients["client_id"].map(ranks)).all()
    noisy = set(noisy_clients(cfg).tolist())
    assert len(noisy) == 4 and (clients["noisy"] == clients["client_id"].isin(noisy)).all()
    head = 4 * 128 + 4                                    # bert-tiny classifier, 4 labels
    expect = (clients["rank"] * (128 + 128) * 4 + head) * 4          # 4 modules of 128×128, float32
    assert (clients["bytes_up"] == expect).all()
    # the dilution script reads the saved updates
    table = dilution_table(tmp_path)
    assert set(table["round"]) == {1, 2} and table["pi"].between(0, 1 + 1e-9).all()
    assert np.allclose(table[table["slot"] < 2]["pi"], 1.0)
    # fedex's global adapter is the zero-padded mean: high slots keep about pi² of what their owners sent
    high = table[(table["slot"] >= 2) & (table["owners"] > 0)]
    assert (high["pi"] < 1).all() and (high["kept"] <= high["pi"] + 1e-9).all()
    capsys.readouterr()
    assert dilution_main([str(tmp_path)]) == 0
    assert "kept_high_mean" in capsys.readouterr().out
    assert dilution_main([str(tmp_path / "no-such-run")]) == 2


def test_by_validation_moves_the_best_scored_clients_to_the_high_rank_and_survives_resume(ray_local, tiny_config,
                                                                                         tmp_path):
    from raysim.cli import main

    sets = {"lora.rank": "{scheme: by_validation, ranks: [2, 8], high_fraction: 0.25, after_round: 1}",
            "aggregator.name": "hetlora", "federation.rounds": 3, "train.local_steps": 2,
            "federation.clients_per_round": 8}
    run_experiment(tiny_config(**sets), tmp_path / "full", progress=False)
    clients = pd.read_parquet(tmp_path / "full" / "clients.parquet")
    assert set(clients[clients["round"] == 1]["rank"]) == {2}                    # everyone starts low
    later = clients[clients["round"] == 2]
    assert sorted(later["rank"].value_counts().to_dict().items()) == [(2, 6), (8, 2)]   # 25 % of 8 clients

    class Stop(Exception):
        pass

    def stop(row, ckpt):
        if row["round"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(tiny_config(**sets), tmp_path / "cut", progress=False, on_round=stop)
    assert main(["run", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    resumed = pd.read_parquet(tmp_path / "cut" / "clients.parquet")
    pd.testing.assert_series_equal(resumed["rank"], clients["rank"])
    pd.testing.assert_series_equal(pd.read_parquet(tmp_path / "cut" / "rounds.parquet")["accuracy"],
                                   pd.read_parquet(tmp_path / "full" / "rounds.parquet")["accuracy"])
