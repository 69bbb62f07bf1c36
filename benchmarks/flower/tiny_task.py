"""The tiny workload for Flower: data, model, local training and evaluation, plus the ClientApp.

Everything a client needs is derived from the run config (benchmarks/flower/tiny.yaml, validated by
raysim's config loader and sent to the clients as JSON) exactly as `raysim run` derives it:

- data: raysim's own synthetic generator, global test split and client partition
  (`raysim.data.sources.load_source`, `raysim.data.federated.split_and_partition`);
- model: raysim's seeded `random:bert-tiny` builder, then PEFT LoRA on query/value with the
  run seed set first, so the round-0 adapter (A Kaiming, B = 0) and head are raysim's bit for bit;
- local training: a fresh AdamW per client and round, `local_steps` batches cut from seeded
  permutations of the client's examples, dropout seeded per (seed, round, client) — raysim's
  batch schedule and client seed (imported from raysim, so they cannot drift);
- the exchanged state: the LoRA factors and the classifier head (the trainable tensors), which
  Flower's FedAvg averages weighted by `num-examples` — FedIT.

This module is imported by name in Flower's Ray actors (not pickled by value as `__main__` would
be), so `workload()` and `model()` build the data and the model once per actor process and every
later client on that actor reuses them, as raysim's workers do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from raysim.engines.base import batch_schedule  # noqa: E402
from raysim.seeds import client_seed  # noqa: E402


@dataclass
class Workload:
    """The run config plus the tokenized examples (torch int64) and raysim's splits."""

    cfg: object                      # raysim.config.ExperimentConfig
    num_labels: int
    input_ids: torch.Tensor          # (N, L)
    attention_mask: torch.Tensor     # (N, L)
    labels: torch.Tensor             # (N,)
    test_idx: np.ndarray             # (T,) global test split
    client_train: list[np.ndarray]   # one index array per client

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return {"input_ids": self.input_ids[t], "attention_mask": self.attention_mask[t], "labels": self.labels[t]}


def load_run_config(path: str, overrides: list[str] | None = None) -> str:
    """The run config at `path` with raysim-style `KEY=VALUE` overrides, validated, as a JSON string
    (the form the ServerApp sends to the clients). Only FedIT is reproduced, so raysim's aggregator
    registry is not needed."""
    import yaml

    from raysim.config import ExperimentConfig, apply_overrides

    raw = yaml.safe_load(Path(path).read_text()) or {}
    cfg = ExperimentConfig.model_validate(apply_overrides(raw, overrides or []))
    if cfg.train.optimizer != "adamw" or cfg.aggregator.name != "fedit" or cfg.data.source != "synthetic:text-cls":
        raise ValueError("flower_tiny reproduces FedIT with AdamW on synthetic:text-cls only")
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


@lru_cache(maxsize=1)
def workload(config_json: str) -> Workload:
    """raysim's data, global test split and partition for the run config (once per process)."""
    from raysim.config import ExperimentConfig
    from raysim.data.federated import split_and_partition
    from raysim.data.sources import load_source
    from raysim.data.tokenize import tokenize

    cfg = ExperimentConfig.model_validate(json.loads(config_json))
    raw = load_source(cfg.data, cfg.seed)
    test_idx, client_train, _ = split_and_partition(raw, cfg)
    tok = tokenize(raw, None, cfg.model.max_length)     # synthetic data is already token ids
    return Workload(cfg=cfg, num_labels=int(raw.num_labels), input_ids=_int64(tok.input_ids),
                    attention_mask=_int64(tok.attention_mask), labels=_int64(tok.labels), test_idx=test_idx,
                    client_train=client_train)


def _int64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


@lru_cache(maxsize=1)
def model(config_json: str) -> torch.nn.Module:
    """The PEFT-wrapped model of the run (once per process), raysim's round-0 initialisation."""
    from peft import LoraConfig, TaskType, get_peft_model

    from raysim.models import build_base_model

    w = workload(config_json)
    cfg = w.cfg
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    base = build_base_model(cfg.model.name, w.num_labels, cfg.seed)
    torch.manual_seed(cfg.seed)                       # the LoRA A initialisation, as raysim seeds it
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.max_rank(), lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    return get_peft_model(base, lora)


def trainable_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The exchanged state: LoRA factors and the classifier head (ArrayRecord copies them)."""
    return {name: p.detach() for name, p in net.named_parameters() if p.requires_grad}


def load_trainable(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (names of `trainable_state`) into the model; every trainable tensor must be there."""
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise KeyError(f"state/model mismatch: {sorted(set(state) ^ set(params))[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def train_local(net: torch.nn.Module, w: Workload, client_id: int, rnd: int) -> float:
    """One client's local training from the loaded global state; returns the mean training loss."""
    train = w.cfg.train
    seed = client_seed(w.cfg.seed, rnd, client_id)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    torch.manual_seed(seed)                                          # dropout, per client
    net.train()
    losses = []
    for idx in batch_schedule(w.client_train[client_id], train.local_steps, train.batch_size, seed):
        loss = net(**w.batch(idx)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(net: torch.nn.Module, w: Workload) -> tuple[float, float]:
    """(mean loss, accuracy) on the global test split, in batches of `eval.batch_size`."""
    net.eval()
    loss_sum, correct, bs = 0.0, 0, w.cfg.eval.batch_size
    for start in range(0, len(w.test_idx), bs):
        batch = w.batch(w.test_idx[start:start + bs])
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    n = len(w.test_idx)
    return loss_sum / n, correct / n


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower client: load the global LoRA factors + head, train locally, send them back."""
    config = msg.content["config"]
    config_json = str(config["workload"])
    w, net = workload(config_json), model(config_json)
    client_id = int(context.node_config["partition-id"])
    load_trainable(net, msg.content["arrays"].to_torch_state_dict())
    loss = train_local(net, w, client_id, int(config["server-round"]))
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(w.client_train[client_id])})
    return Message(content=RecordDict({"arrays": ArrayRecord(trainable_state(net)), "metrics": metrics}),
                   reply_to=msg)
