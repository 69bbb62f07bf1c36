"""Sequence classification: an encoder with a classification head; accuracy and cross-entropy."""

from __future__ import annotations

import numpy as np

from raysim.tasks.base import Task, add_examples, group_codes


class SeqClsTask(Task):
    name = "seq_cls"
    peft_task_type = "SEQ_CLS"
    metrics = ("accuracy", "loss")

    def arrays(self, raw) -> dict[str, np.ndarray]:
        from raysim.models import tokenize_for_model

        arrays = tokenize_for_model(raw, self.cfg)
        if self.cfg.eval.group_by:
            arrays["eval_group"], self.group_names = group_codes(raw, self.cfg.eval.group_by)
        return arrays

    def batch(self, data, idx: np.ndarray):
        return data.batch(idx, ("input_ids", "attention_mask", "labels"))

    def evaluate(self, model, data, idx: np.ndarray, batch_size: int, autocast, gen_idx=None):
        import torch

        from raysim.engines.base import EvalResult

        total = EvalResult.zero()
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            batch = self.batch(data, rows)
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
            hit = logits.argmax(dim=-1) == batch["labels"]
            total = add_examples(total, {"loss_sum": loss.double().cpu().numpy(), "correct": hit.cpu().numpy(),
                                         "count": np.ones(len(rows))}, data.groups(rows))
        return total
