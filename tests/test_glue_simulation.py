"""GLUE-style runs end to end: sentence-pair classification logs MCC and macro-F1, regression logs Pearson and
Spearman (accuracy null); the logged values are recomputed with scikit-learn/scipy from the saved adapter's
predictions on the same test split. A regression config with a non-numeric label column exits 2 before Ray."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from raysim.cli import main
from raysim.runner import run_experiment

pytestmark = pytest.mark.ray

SMALL = {"data.synthetic.num_examples": 480, "data.synthetic.seq_len": 24, "data.synthetic.key_fraction": 0.5, "model.max_length": 24,
         "federation.num_clients": 4, "federation.clients_per_round": 2, "federation.rounds": 2,
         "data.partition": "{scheme: iid, min_samples: 8}", "train.local_steps": 20, "train.lr": 2.0e-2}


def _predictions(run_dir):
    """The final adapter's per-example predictions on the run's global test split."""
    from raysim.engines.peft_engine import DataArrays
    from raysim.evaluation import load_run_model
    from raysim.tasks import task_for

    model, cfg, raw, partition = load_run_model(run_dir)
    task = task_for(cfg)
    data = DataArrays(task.arrays(raw), torch.device("cpu"))
    with torch.no_grad():
        return task.evaluate(model, data, np.asarray(partition["test_idx"]), 64, contextlib.nullcontext).arrays


def test_pair_classification_logs_mcc_and_macro_f1(ray_local, tiny_config, tmp_path):
    cfg = tiny_config(**SMALL, **{"data.source": "synthetic:text-pair", "data.synthetic.num_labels": 3})
    run_experiment(cfg, tmp_path, progress=False)
    df = pd.read_parquet(tmp_path / "rounds.parquet")
    assert list(df["round"]) == [1, 2]
    assert df["mcc"].notna().all() and df["macro_f1"].notna().all() and df["accuracy"].notna().all()
    assert df["pearson"].isna().all() and df["spearman"].isna().all()
    pred = _predictions(tmp_path)
    assert len(np.unique(pred["pred"])) > 1                       # not a constant prediction: the metrics say something
    final = df.iloc[-1]
    assert final["accuracy"] == pytest.approx(np.mean(pred["pred"] == pred["target"]), abs=1e-12)
    assert final["mcc"] == pytest.approx(matthews_corrcoef(pred["target"], pred["pred"]), abs=1e-9)
    assert final["macro_f1"] == pytest.approx(f1_score(pred["target"], pred["pred"], average="macro"), abs=1e-9)


def test_regression_logs_pearson_and_spearman_with_null_accuracy(ray_local, tiny_config, tmp_path):
    cfg = tiny_config(**SMALL, **{"task.type": "regression", "data.source": "synthetic:regression"})
    run_experiment(cfg, tmp_path, progress=False)
    df = pd.read_parquet(tmp_path / "rounds.parquet")
    assert df["accuracy"].isna().all() and df["macro_f1"].isna().all() and df["mcc"].isna().all()
    assert df["pearson"].notna().all() and df["spearman"].notna().all() and df["loss"].notna().all()
    pred = _predictions(tmp_path)
    final = df.iloc[-1]
    assert final["pearson"] == pytest.approx(stats.pearsonr(pred["score"], pred["target_score"])[0], abs=1e-6)
    assert final["spearman"] == pytest.approx(stats.spearmanr(pred["score"], pred["target_score"])[0], abs=1e-6)
    assert final["loss"] == pytest.approx(np.mean((pred["score"] - pred["target_score"]) ** 2), rel=1e-5)


def test_regression_with_a_non_numeric_label_column_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    import raysim.runner
    from raysim.config import load_config

    path = tmp_path / "sts.csv"
    pd.DataFrame({"text": ["a b", "c d", "e f", "g h"] * 50, "pair": ["x", "y", "z", "w"] * 50,
                  "score": [0.5, 1.0, 3.0, 4.5] * 50, "genre": ["news", "forum"] * 100}).to_csv(path, index=False)
    sets = ["task.type=regression", f"data.source=csv:{path}", "data.text_pair_column=pair"]
    raw, _ = raysim.runner.prepare_data(load_config("experiments/tiny.yaml", [*sets, "data.label_column=score"]))
    assert raw.targets is not None and raw.text_pairs[:2] == ["x", "y"]           # the numeric column is fine
    monkeypatch.setattr(raysim.runner, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    args = [x for key in [*sets, "data.label_column=genre"] for x in ("--set", key)]
    rc = main(["run", "experiments/tiny.yaml", "--out", str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("data.label_column") == 1 and "numeric" in err and "Traceback" not in err
