"""The causal-LM task without Ray: answer matching, the generation subset, metrics and per-group sums."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raysim.engines.base import EvalResult
from raysim.metrics import group_rows
from raysim.tasks.base import add_examples
from raysim.tasks.causal_lm import CausalLMTask, matches


@pytest.mark.parametrize("got,want,mode,ok", [
    (" 6", "6", "exact", True), ("6 ", "7", "exact", False), ("56", "6", "exact", False),
    ("so the answer is 42.", "#### 42", "number", True), ("41 then 42", "42", "number", True),
    ("no number", "42", "number", False), ("3.50", "3.5", "number", True),
])
def test_matches(got, want, mode, ok):
    assert matches(got, want, mode) is ok


def test_generation_subset_is_seeded_and_bounded(tiny_config):
    cfg = tiny_config(**{"task.type": "causal_lm", "model.name": "random:llama-tiny",
                         "data.source": "synthetic:arith", "eval.max_examples": 5})
    task = CausalLMTask(cfg)
    idx = np.arange(100, 140)
    a, b = task.generation_subset(idx, 0), task.generation_subset(idx, 0)
    assert len(a) == 5 and np.array_equal(a, b) and set(a) <= set(idx) and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, task.generation_subset(idx, 1))
    cfg.eval.max_examples = None
    assert np.array_equal(CausalLMTask(cfg).generation_subset(idx, 0), idx)


def test_metrics_and_groups_from_per_example_sums():
    total = add_examples(EvalResult.zero(), {"nll_sum": np.array([2.0, 4.0, 6.0]), "tokens": np.array([1, 1, 2]),
                                             "count": np.ones(3)}, np.array([0, 1, 1]))
    total = add_examples(total, {"exact": np.array([1.0, 0.0]), "generated": np.ones(2)}, np.array([0, 1]))
    m = total.metrics()
    assert m["loss"] == pytest.approx(12 / 4) and m["perplexity"] == pytest.approx(math.exp(3))
    assert m["exact_match"] == 0.5 and m["accuracy"] is None
    by = total.by_group()
    assert by[0].metrics()["loss"] == 2.0 and by[1].metrics()["loss"] == pytest.approx(10 / 3)
    rows = {(r["group"], r["metric"]): (r["value"], r["n"]) for r in group_rows(5, total, ["+", "*"])}
    assert rows[("+", "exact_match")] == (1.0, 1) and rows[("*", "exact_match")] == (0.0, 1)
    assert rows[("*", "loss")] == (pytest.approx(10 / 3), 2)
    assert ("+", "accuracy") not in rows                       # no such metric for a causal task


def test_classification_sums_keep_their_meaning():
    total = EvalResult.classification(3.0, 2, 4) + EvalResult.classification(1.0, 1, 4)
    assert total.metrics() == {"accuracy": 3 / 8, "loss": 0.5, "perplexity": None, "exact_match": None,
                               "macro_f1": None, "mcc": None, "pearson": None, "spearman": None}
