"""Offline use of a finished run: rebuild the trained model from its directory and evaluate it.

The adapter directory is a plain PEFT adapter; methods that changed the frozen base (FedEx-LoRA,
FLoRA) also leave `adapter/base_delta.safetensors` (W_base − W0 per module, nn.Linear orientation),
which must be folded into the base before the adapter is loaded.
"""

from __future__ import annotations

import contextlib
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
    base = build_base_model(cfg.model.name, raw.num_labels, cfg.seed, task=cfg.task.type)
    delta_file = run_dir / "adapter" / "base_delta.safetensors"
    if delta_file.exists():
        modules = dict(base.named_modules())
        for key, delta in load_file(str(delta_file)).items():
            fold_into_base(modules[key.removesuffix(".base_delta")], torch.from_numpy(delta.astype(np.float64)))
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    return model.eval(), cfg, raw, partition


def evaluate_run(run_dir: str | Path, batch_size: int = 64, client: int | None = None) -> dict[str, float | None]:
    """The final model's metrics on the run's global test split (accuracy and loss; for causal_lm loss,
    perplexity and exact_match on the same generation subset as the run), or on one client's local test
    split (`client`)."""
    import torch

    from raysim.engines.peft_engine import DataArrays
    from raysim.tasks import task_for

    from raysim.clients import client_index

    model, cfg, raw, partition = load_run_model(run_dir)
    task = task_for(cfg)
    if client is not None and partition.get("per_client") is not None:    # per-client data: its own examples
        raw = partition["per_client"].client(client)
    data = DataArrays(task.arrays(raw), torch.device("cpu"))
    idx = np.asarray(partition["test_idx"] if client is None else client_index(partition, cfg).test[client])
    gen = task.generation_subset(idx, cfg.seed) if client is None else None
    with torch.no_grad():
        total = task.evaluate(model, data, idx, batch_size, contextlib.nullcontext, gen)
    metrics = total.metrics()
    return {k: v for k, v in metrics.items() if k in task.metrics}
