"""The task contract (no torch at import time: the driver and the coordinator import this module)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class Task:
    """One kind of learning problem. Subclasses set the class attributes and implement the methods.

    - `arrays(raw)` runs where the data is prepared (the coordinator): the tokenised examples as numpy
      arrays for the object store; per-example arrays are indexed by example on axis 0.
    - `batch(data, idx)` and `evaluate(...)` run on the workers, with torch.
    """

    name: ClassVar[str] = ""
    peft_task_type: ClassVar[str | None] = ""   # PEFT TaskType of the exported adapter (None: no task type)
    metrics: ClassVar[tuple[str, ...]] = ()      # rounds.parquet columns this task always fills
    default_metrics: ClassVar[tuple[str, ...]] = ()   # prediction metrics logged unless eval.metrics says

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.disk_cache = True          # tokenised arrays cached on disk (not for one client's examples)

    def arrays(self, raw) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def batch(self, data, idx: np.ndarray) -> dict[str, Any]:
        """Model inputs (with labels) of the examples `idx`, on the data's device."""
        raise NotImplementedError

    def evaluate(self, model, data, idx: np.ndarray, batch_size: int, autocast, gen_idx=None):
        """An `EvalResult` of sums over the examples `idx` with the loaded adapter."""
        raise NotImplementedError

    def generation_subset(self, idx: np.ndarray, seed: int) -> np.ndarray | None:
        """The examples evaluated by generation (None: the task does not generate)."""
        return None

    def with_groups(self, arrays: dict[str, np.ndarray], raw) -> dict[str, np.ndarray]:
        """`arrays` plus each example's `eval.group_by` group code (`eval_group`); remembers the group names."""
        if self.cfg.eval.group_by:
            arrays["eval_group"], self.group_names = group_codes(raw, self.cfg.eval.group_by)
        return arrays


def group_codes(raw, column: str) -> tuple[np.ndarray, list[str]]:
    """Per-example codes of a data column's values (for eval.group_by) and the value names."""
    values = np.asarray(raw.columns[column]).astype(str)
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def add_examples(total, per_example: dict[str, np.ndarray], groups: np.ndarray | None,
                 predictions: dict[str, np.ndarray] | None = None):
    """`total` plus the sums of per-example values, overall and, with `groups`, per group
    (keys `group/<code>/<name>`), and the batch's `predictions` (kept per example, for macro_f1 etc.)."""
    from raysim.engines.base import EvalResult

    sums = {k: float(np.sum(v)) for k, v in per_example.items()}
    if groups is not None:
        for g in np.unique(groups):
            mask = groups == g
            sums.update({f"group/{int(g)}/{k}": float(np.sum(v[mask])) for k, v in per_example.items()})
    return total + EvalResult(sums, dict(predictions or {}))
