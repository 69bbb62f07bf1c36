"""Regression (STS-B style): an encoder with a one-output head trained with the mean squared error; evaluated
by the loss (mean squared error) and the Pearson and Spearman correlations of the predicted scores."""

from __future__ import annotations

import numpy as np

from raysim.tasks.seq_cls import SeqClsTask


class RegressionTask(SeqClsTask):
    """Sequence classification with one output: ``labels`` in the arrays are the float32 targets (so
    transformers' ``problem_type: regression`` head computes the MSE); ``example_labels`` keep the score bins
    of ``RawData.labels`` for client hooks that count labels. Never produces ``correct``, so accuracy stays
    null."""

    name = "regression"
    peft_task_type = "SEQ_CLS"
    metrics = ("loss",)
    default_metrics = ("pearson", "spearman")

    def arrays(self, raw) -> dict[str, np.ndarray]:
        if raw.targets is None:
            raise ValueError("task.type regression needs RawData.targets (numeric scores); this data has classes")
        arrays = super().arrays(raw)
        arrays["labels"] = np.asarray(raw.targets, dtype=np.float32)
        arrays["example_labels"] = np.asarray(raw.labels, dtype=np.int64)      # score bins, for client hooks
        return arrays

    @staticmethod
    def batch_values(logits, labels) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-example squared error and count, and the predicted and true scores, of one batch."""
        score = logits[:, 0].double().cpu().numpy()
        target = labels.double().cpu().numpy()
        return ({"loss_sum": (score - target) ** 2, "count": np.ones(len(score))},
                {"score": score, "target_score": target})
