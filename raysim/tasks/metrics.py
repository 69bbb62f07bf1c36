"""Metrics computed from per-example predictions (numpy only; checked against scikit-learn and scipy in tests)."""

from __future__ import annotations

import numpy as np

CLASSIFICATION = ("accuracy", "macro_f1", "mcc")
REGRESSION = ("pearson", "spearman")


def _confusion(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    k = int(max(pred.max(initial=0), target.max(initial=0))) + 1
    out = np.zeros((k, k), dtype=np.float64)
    np.add.at(out, (target.astype(np.int64), pred.astype(np.int64)), 1)
    return out


def macro_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes present in the targets or the predictions."""
    c = _confusion(pred, target)
    tp, fp, fn = np.diag(c), c.sum(axis=0) - np.diag(c), c.sum(axis=1) - np.diag(c)
    present = (tp + fp + fn) > 0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def mcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form; 0 when undefined)."""
    c = _confusion(pred, target)
    t, p, n, correct = c.sum(axis=1), c.sum(axis=0), c.sum(), np.trace(c)
    den = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - t @ p) / den) if den > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def from_predictions(arrays: dict[str, np.ndarray]) -> dict[str, float | None]:
    """macro_f1 and mcc from `pred`/`target`; pearson and spearman from `score`/`target_score`."""
    out: dict[str, float | None] = {}
    if "pred" in arrays and len(arrays["pred"]):
        out["macro_f1"] = macro_f1(arrays["pred"], arrays["target"])
        out["mcc"] = mcc(arrays["pred"], arrays["target"])
    if "score" in arrays and len(arrays["score"]):
        out["pearson"] = pearson(arrays["score"], arrays["target_score"])
        out["spearman"] = spearman(arrays["score"], arrays["target_score"])
    return out
