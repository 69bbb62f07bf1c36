"""Offline use of a finished run: rebuild the trained model from its directory and evaluate it.

The adapter directory is a plain PEFT adapter; methods that changed the frozen base (FedEx-LoRA,
FLoRA) also leave `adapter/base_delta.safetensors` (W_base − W0 per module, nn.Linear orientation),
which must be folded into the base before the adapter is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_run_model(run_dir: str | Path):
    """(PeftModel in eval mode, ExperimentConfig, RawData, partition) rebuilt from a run directory."""
    import torch
    import yaml
    from peft import PeftModel
    from safetensors.numpy import load_file

    from raysim.config import validate_config
    from raysim.lora.peft_io import fold_into_base
    from raysim.models import build_base_model
    from raysim.runner import prepare_data

    run_dir = Path(run_dir)
    cfg = validate_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    raw, partition = prepare_data(cfg)
    base = build_base_model(cfg.model.name, raw.num_labels, cfg.seed)
    delta_file = run_dir / "adapter" / "base_delta.safetensors"
    if delta_file.exists():
        modules = dict(base.named_modules())
        for key, delta in load_file(str(delta_file)).items():
            fold_into_base(modules[key.removesuffix(".base_delta")], torch.from_numpy(delta.astype(np.float64)))
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    return model.eval(), cfg, raw, partition


def evaluate_run(run_dir: str | Path, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and loss of the saved final model on the run's global test split."""
    import torch

    from raysim.models import tokenize_for_model

    model, cfg, raw, partition = load_run_model(run_dir)
    arrays = tokenize_for_model(raw, cfg)
    idx = np.asarray(partition["test_idx"])
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            mask = torch.from_numpy(arrays["attention_mask"][rows].astype(np.int64))
            length = max(1, int(mask.sum(dim=1).max()))
            ids = torch.from_numpy(arrays["input_ids"][rows].astype(np.int64))[:, :length]
            labels = torch.from_numpy(arrays["labels"][rows])
            logits = model(input_ids=ids, attention_mask=mask[:, :length]).logits
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
    return {"accuracy": correct / len(idx), "loss": loss_sum / len(idx)}
