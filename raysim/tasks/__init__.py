"""Task types: what a batch holds, the loss, the evaluation metrics and the PEFT task type.

`task_for(cfg)` returns the task of `cfg.task.type`; engines, evaluation and export go through it instead
of assuming a classification head. A new task type is one new module here plus its entry in TASKS.
"""

from __future__ import annotations

import importlib

from raysim.tasks.base import Task

# task.type -> "module:Class" (imported on first use, so each task's imports stay its own)
TASKS: dict[str, str] = {
    "seq_cls": "raysim.tasks.seq_cls:SeqClsTask",
    "regression": "raysim.tasks.regression:RegressionTask",
    "causal_lm": "raysim.tasks.causal_lm:CausalLMTask",
    "image_cls": "raysim.tasks.image_cls:ImageClsTask",
}

ROW_METRICS = ("accuracy", "loss", "perplexity", "exact_match", "macro_f1", "mcc", "pearson", "spearman")


def task_class(name: str) -> type[Task]:
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def task_for(cfg) -> Task:
    return task_class(cfg.task.type)(cfg)


def logged_metrics(cfg) -> tuple[str, ...]:
    """The rounds.parquet metric columns this run fills: loss always, the task's own (perplexity,
    exact_match), and `eval.metrics` or the task's defaults."""
    task = task_class(cfg.task.type)
    chosen = tuple(cfg.eval.metrics) if cfg.eval.metrics is not None else task.default_metrics
    return tuple(m for m in ROW_METRICS if m in ("loss", *task.metrics, *chosen))


__all__ = ["ROW_METRICS", "TASKS", "Task", "logged_metrics", "task_class", "task_for"]
