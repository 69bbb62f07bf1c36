"""The regression task on a tiny random encoder: arrays, the training loss, evaluation sums and metrics."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from scipy import stats

from raysim.data.sources import load_source
from raysim.engines.peft_engine import DataArrays
from raysim.models import build_base_model
from raysim.tasks import logged_metrics, task_for
from raysim.tasks.regression import RegressionTask


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = tiny_config(**{"task.type": "regression", "data.source": "synthetic:regression",
                         "data.synthetic.num_examples": 120})
    raw = load_source(cfg.data, cfg.seed, task="regression")
    task = task_for(cfg)
    arrays = task.arrays(raw)
    model = build_base_model(cfg.model.name, raw.num_labels, cfg.seed, task="regression").eval()
    return cfg, raw, task, arrays, model


def test_arrays_hold_float_targets_and_bins(setup):
    cfg, raw, task, arrays, _ = setup
    assert isinstance(task, RegressionTask) and task.peft_task_type == "SEQ_CLS"
    assert arrays["labels"].dtype == np.float32 and np.array_equal(arrays["labels"], raw.targets)
    assert np.array_equal(arrays["example_labels"], raw.labels) and arrays["example_labels"].dtype == np.int64
    assert arrays["input_ids"].shape == (120, cfg.model.max_length)
    assert logged_metrics(cfg) == ("loss", "pearson", "spearman")
    no_targets = raw.subset(np.arange(4))
    no_targets.targets = None
    with pytest.raises(ValueError, match="targets"):
        task.arrays(no_targets)


def test_evaluate_sums_squared_errors_and_keeps_predictions(setup):
    _, raw, task, arrays, model = setup
    data = DataArrays(arrays, torch.device("cpu"))
    idx = np.arange(7, 100)
    with torch.no_grad():
        total = task.evaluate(model, data, idx, 16, contextlib.nullcontext)
        out = model(input_ids=torch.as_tensor(arrays["input_ids"][idx], dtype=torch.long),
                    attention_mask=torch.as_tensor(arrays["attention_mask"][idx], dtype=torch.long)).logits[:, 0]
    score = out.double().numpy()
    assert total.sums["count"] == len(idx) and "correct" not in total.sums
    assert np.allclose(total.arrays["score"], score, atol=1e-5)
    assert np.array_equal(total.arrays["target_score"], raw.targets[idx].astype(np.float64))
    m = total.metrics()
    assert m["loss"] == pytest.approx(np.mean((score - raw.targets[idx]) ** 2), rel=1e-5)
    assert m["accuracy"] is None and m["macro_f1"] is None and m["mcc"] is None
    assert m["pearson"] == pytest.approx(stats.pearsonr(total.arrays["score"], raw.targets[idx])[0], abs=1e-9)
    assert m["spearman"] == pytest.approx(stats.spearmanr(total.arrays["score"], raw.targets[idx])[0], abs=1e-9)


def test_training_loss_is_the_mse_and_groups_are_summed(setup):
    _, raw, task, arrays, model = setup
    data = DataArrays(dict(arrays, eval_group=np.arange(120) % 2), torch.device("cpu"))
    idx = np.arange(0, 40)
    with torch.no_grad():
        train_loss = float(model(**task.batch(data, idx)).loss)             # transformers' regression head
        total = task.evaluate(model, data, idx, 40, contextlib.nullcontext)
    assert train_loss == pytest.approx(total.metrics()["loss"], rel=1e-5)
    groups = total.by_group()
    assert sorted(groups) == [0, 1] and groups[0].sums["count"] == groups[1].sums["count"] == 20
    assert groups[0].sums["loss_sum"] + groups[1].sums["loss_sum"] == pytest.approx(total.sums["loss_sum"])
    assert groups[0].metrics()["accuracy"] is None
