"""Sequence classification: an encoder with a classification head; accuracy and cross-entropy, and macro-F1 and
MCC from the per-example predictions. Sentence pairs (``data.text_pair_column``, ``synthetic:text-pair``) need
nothing special here: `tokenize_for_model` already returns them pair-encoded (``[CLS] a [SEP] b [SEP]``)."""

from __future__ import annotations

import numpy as np

from raysim.tasks.base import Task, add_examples


class SeqClsTask(Task):
    name = "seq_cls"
    peft_task_type = "SEQ_CLS"
    metrics = ("accuracy", "loss")
    default_metrics = ("accuracy", "macro_f1", "mcc")

    def arrays(self, raw) -> dict[str, np.ndarray]:
        from raysim.models import tokenize_for_model

        return self.with_groups(tokenize_for_model(raw, self.cfg, self.disk_cache), raw)

    def batch(self, data, idx: np.ndarray):
        return data.batch(idx, ("input_ids", "attention_mask", "labels"))

    def evaluate(self, model, data, idx: np.ndarray, batch_size: int, autocast, gen_idx=None):
        from raysim.engines.base import EvalResult

        total = EvalResult.zero()
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            batch = self.batch(data, rows)
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_example, predictions = self.batch_values(logits.float(), batch["labels"])
            total = add_examples(total, per_example, data.groups(rows), predictions)
        return total

    @staticmethod
    def batch_values(logits, labels) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-example sums (cross-entropy, correct, count) and predictions (pred, target) of one batch."""
        import torch

        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        pred = logits.argmax(dim=-1)
        return ({"loss_sum": loss.double().cpu().numpy(), "correct": (pred == labels).cpu().numpy(),
                 "count": np.ones(len(labels))},
                {"pred": pred.cpu().numpy(), "target": labels.cpu().numpy()})
