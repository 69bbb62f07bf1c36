"""Rows of rounds.parquet / clients.parquet and the wire dump of `output.save_updates`, from plain data.

Pure functions: the coordinator gathers the round's facts, these turn them into records.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from raysim.aggregators.base import ClientPlan, ClientUpdate
from raysim.lora.factors import Factors

SHORT = {"a": "lora_A", "b": "lora_B", "c": "lora_C"}


def weighted(values: list[float], weights: list[float]) -> float | None:
    """The weighted mean, or None without values."""
    return float(np.average(values, weights=weights)) if values else None


PERSONAL_METRICS = ("personalized_accuracy", "personalized_accuracy_mean", "personalized_accuracy_p10",
                    "personalized_loss")


def personal_summary(results: dict[int, Any], weights: dict[int, float]) -> dict[str, float | None]:
    """rounds.parquet's personalised columns from each client's evaluation (an EvalResult) on its own local
    test split: accuracy as the p-weighted mean (p_k = the client's aggregation weight), the unweighted mean
    and the 10th percentile over clients; the loss as the p-weighted mean."""
    acc = {c: r.accuracy for c, r in results.items() if r.accuracy is not None}
    loss = {c: r.loss for c, r in results.items() if r.loss is not None}
    values = list(acc.values())
    return {"personalized_accuracy": weighted(values, [weights[c] for c in acc]) if sum(weights[c] for c in acc) else None,
            "personalized_accuracy_mean": float(np.mean(values)) if values else None,
            "personalized_accuracy_p10": float(np.percentile(values, 10)) if values else None,
            "personalized_loss": weighted(list(loss.values()), [weights[c] for c in loss]) if sum(weights[c] for c in loss) else None}


def client_row(rnd: int, cid: int, rank: int, plan: ClientPlan, outcome, num_samples: int, noisy: bool,
               bytes_up: int) -> dict[str, Any]:
    r = outcome.result
    return {"round": rnd, "client_id": cid, "worker": outcome.worker,
            "rank": next((f.rank for f in plan.start.values()), rank),
            "noisy": noisy, "num_samples": num_samples,
            "train_loss": r.train_loss if r else None, "train_time_s": r.train_time_s if r else None,
            "bytes_up": bytes_up if r else 0,
            "local_accuracy": None, "local_loss": None,    # personalised evaluation, filled in when it ends
            "status": outcome.status, "error": outcome.error or None}


def upload_tensors(update: ClientUpdate, plan: ClientPlan) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Exactly what one client uploaded (PEFT names, unscaled) and its safetensors metadata (weight, scale)."""
    tensors, scales = {}, {}
    for name, f in update.factors.items():
        for key in sorted(plan.upload):
            tensors[f"{name}.{SHORT[key]}"] = np.ascontiguousarray(getattr(f, key), dtype=np.float32)
        scales[name] = f.scale
    if update.hook_output is not None:             # e.g. CE-LoRA's one-off data descriptor
        tensors["descriptor"] = np.ascontiguousarray(update.hook_output, dtype=np.float32)
    uniq = set(scales.values())
    scale = repr(uniq.pop()) if len(uniq) == 1 else json.dumps(scales)
    return tensors, {"weight": repr(update.weight), "scale": scale}


def global_tensors(factors: Factors, base_delta: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The global state after aggregation: factors (unscaled) and the cumulative base delta, if any."""
    out = {}
    for name, f in factors.items():
        for key in ("a", "b", "c"):
            if getattr(f, key) is not None:
                out[f"{name}.{SHORT[key]}"] = np.ascontiguousarray(getattr(f, key), dtype=np.float32)
    for name, delta in (base_delta or {}).items():
        out[f"{name}.base_delta"] = delta.astype(np.float32)
    return out


def frozen_changed(start: Factors, end: Factors, train: frozenset[str]) -> list[str]:
    """`module.factor` names whose frozen factor (not in `train`) differs bit for bit between the factors
    a client was sent (`start`) and those it returned (`end`): FFA-LoRA and RoLoRA are exact only if
    every client's frozen factor is the broadcast one (docs/algorithms.md, FFA-LoRA and RoLoRA)."""
    changed = []
    for name, f in start.items():
        for key in ("a", "b", "c"):
            if key in train or getattr(f, key) is None:
                continue
            if not np.array_equal(np.asarray(getattr(f, key)), np.asarray(getattr(end[name], key))):
                changed.append(f"{name}.{key}")
    return changed
