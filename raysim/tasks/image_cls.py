"""Image classification: a ViT or MLP-Mixer with a classification head; accuracy, cross-entropy, macro-F1.

The images of `RawData` ([0, 1] intensities) become the model's `pixel_values` here, once, where the data
is prepared: channels and size adapted to the model and normalised (`raysim.data.images.to_model_input`).
PEFT has no image task type: the adapter is wrapped without one and the head is an explicit
`modules_to_save` (`raysim.models.modules_to_save`).
"""

from __future__ import annotations

import numpy as np

from raysim.tasks.base import Task, add_examples


class ImageClsTask(Task):
    name = "image_cls"
    peft_task_type = None
    metrics = ("accuracy", "loss")
    default_metrics = ("accuracy", "macro_f1")

    def arrays(self, raw) -> dict[str, np.ndarray]:
        """pixel_values (N, C, S, S) float32, labels (N,) int64, and eval_group codes with eval.group_by."""
        from raysim.config import ConfigError
        from raysim.data.images import to_model_input
        from raysim.models import image_spec

        if raw.images is None:
            raise ConfigError(f"data.source: {self.cfg.data.source} holds no images; task.type image_cls "
                              "needs images")
        spec = image_spec(self.cfg.model.name)
        size = self.cfg.data.image_size
        if size is not None and size != spec["image_size"]:
            raise ConfigError(f"data.image_size: {size} differs from the {spec['image_size']}-pixel input of "
                              f"{self.cfg.model.name}; leave it null to use the model's size")
        arrays = {"pixel_values": to_model_input(raw.images, spec), "labels": np.asarray(raw.labels, np.int64)}
        return self.with_groups(arrays, raw)

    def batch(self, data, idx: np.ndarray):
        return data.batch(idx, ("pixel_values", "labels"))

    def evaluate(self, model, data, idx: np.ndarray, batch_size: int, autocast, gen_idx=None):
        import torch

        from raysim.engines.base import EvalResult
        from raysim.tasks.seq_cls import SeqClsTask

        total = EvalResult.zero()
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            batch = self.batch(data, rows)
            with torch.no_grad(), autocast():
                logits = model(pixel_values=batch["pixel_values"]).logits
            per_example, predictions = SeqClsTask.batch_values(logits.float(), batch["labels"])
            total = add_examples(total, per_example, data.groups(rows), predictions)
        return total
