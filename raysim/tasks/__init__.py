"""Task types: what a batch holds, the loss, the evaluation metrics and the PEFT task type.

`task_for(cfg)` returns the task of `cfg.task.type`; engines, evaluation and export go through it instead
of assuming a classification head. A new task type is one new module here plus its entry in TASKS.
"""

from __future__ import annotations

from raysim.tasks.base import Task
from raysim.tasks.causal_lm import CausalLMTask
from raysim.tasks.seq_cls import SeqClsTask

TASKS: dict[str, type[Task]] = {"seq_cls": SeqClsTask, "causal_lm": CausalLMTask}


def task_for(cfg) -> Task:
    return TASKS[cfg.task.type](cfg)


__all__ = ["TASKS", "Task", "task_for"]
