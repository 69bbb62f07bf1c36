"""The prediction metrics against scikit-learn and scipy on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from raysim.tasks.metrics import from_predictions, macro_f1, mcc, pearson, spearman


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 5)])
def test_classification_metrics_match_scikit_learn(seed, k):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, size=200)
    pred = np.where(rng.random(200) < 0.6, target, rng.integers(0, k, size=200))
    assert macro_f1(pred, target) == pytest.approx(f1_score(target, pred, average="macro"), abs=1e-12)
    assert mcc(pred, target) == pytest.approx(matthews_corrcoef(target, pred), abs=1e-12)


def test_regression_metrics_match_scipy_with_ties():
    rng = np.random.default_rng(3)
    y = np.round(rng.normal(size=150), 1)                         # ties on both sides
    x = np.round(y + rng.normal(scale=0.5, size=150), 1)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_degenerate_inputs_give_zero_or_none():
    assert mcc(np.zeros(5), np.zeros(5)) == 0.0 and pearson(np.ones(4), np.arange(4)) is None
    got = from_predictions({"score": np.arange(3.0), "target_score": np.arange(3.0)})
    assert got == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
