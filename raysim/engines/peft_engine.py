"""The reference engine: one resident PEFT model, clients trained one after another.

The base model is built once; for each client the engine copies its factors and head into the
existing parameters, builds a fresh optimiser over the trainable tensors (local optimiser state is
reset every round, see docs/algorithms.md, FedIT), trains, and reads the tensors back as numpy.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from raysim.engines.base import ClientJob, ClientResult, EngineSettings, EvalResult, batch_schedule
from raysim.lora.peft_io import ADAPTER, get_factors, get_head, head_parameters, lora_layers, set_factors, set_head
from raysim.lora.tri import factor_parameters


def make_optimizer(name: str, params: list[torch.nn.Parameter] | list[dict], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _view(arr: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory (read-only object-store arrays included: never written through)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.asarray(arr))


def widen(labels: torch.Tensor) -> torch.Tensor:
    """Class ids or token labels as int64 (what the losses take); float targets as they are."""
    return labels if labels.is_floating_point() else labels.long()


class DataArrays:
    """Tokenised examples as torch tensors over the object store's numpy arrays.

    Always: input_ids, attention_mask (N, L) right-padded, labels ((N,) class ids or (N, L) token labels
    with -100 where no loss is taken). Causal LM data also holds left-padded prompts for generation
    (prompt_ids, prompt_mask (N, P)) and the reference responses (response_text).
    """

    def __init__(self, arrays: dict[str, np.ndarray], device: torch.device):
        self.pixel_values = arrays.get("pixel_values")      # (N, C, H, W) float32 images (image_cls)
        if self.pixel_values is None:
            # the object store's arrays as they are (int32 ids, int8 masks: no int64 copy per worker);
            # `batch` and the cohort engine widen the rows they select
            self.input_ids = _view(arrays["input_ids"])                  # (N, L)
            self.attention_mask = _view(arrays["attention_mask"])        # (N, L)
        else:
            self.pixel_values = _view(np.asarray(self.pixel_values, dtype=np.float32))
        labels = np.asarray(arrays["labels"])
        self.labels = _view(labels.astype(np.float32, copy=False) if labels.dtype.kind == "f" else labels)
        self.prompt_ids = arrays.get("prompt_ids")
        self.prompt_mask = arrays.get("prompt_mask")
        self.response_text = arrays.get("response_text")
        self.eval_group = arrays.get("eval_group")          # per-example group codes (eval.group_by)
        self.device = device

    def batch(self, idx: np.ndarray, keys=("input_ids", "attention_mask", "labels")) -> dict[str, torch.Tensor]:
        """Rows `idx`: images, or token rows trimmed to the longest real sequence (padding is on the right).
        Labels: class ids, float targets (regression) or token labels (causal LM)."""
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        labels = widen(self.labels[t])
        if self.pixel_values is not None:
            out = {"pixel_values": self.pixel_values[t], "labels": labels}
        else:
            mask = self.attention_mask[t]
            length = max(1, int(mask.sum(dim=1).max()))
            out = {"input_ids": self.input_ids[t, :length].long(), "attention_mask": mask[:, :length].long(),
                   "labels": labels[:, :length] if labels.dim() == 2 else labels}
        return {k: out[k].to(self.device) for k in keys}

    def prompts(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts of rows `idx`, without the columns that are padding in every row."""
        ids = torch.from_numpy(np.asarray(self.prompt_ids[np.asarray(idx)], dtype=np.int64))
        mask = torch.from_numpy(np.asarray(self.prompt_mask[np.asarray(idx)], dtype=np.int64))
        first = int((mask.sum(dim=0) > 0).float().argmax()) if mask.any() else 0
        return ids[:, first:].to(self.device), mask[:, first:].to(self.device)

    def groups(self, idx: np.ndarray) -> np.ndarray | None:
        return None if self.eval_group is None else np.asarray(self.eval_group)[np.asarray(idx)]

    def responses(self, idx: np.ndarray) -> list[str]:
        return [str(x) for x in self.response_text[np.asarray(idx)]]


class PeftEngine:
    def __init__(self, model, data: DataArrays, settings: EngineSettings, task=None):
        from raysim.tasks.seq_cls import SeqClsTask

        self.model = model
        self.data = data
        self.task = task or SeqClsTask(None)
        self.settings = settings
        self.optimizer_name = settings.optimizer
        self.lr = settings.lr
        self.weight_decay = settings.weight_decay
        self.batch_size = settings.batch_size
        self.max_grad_norm = settings.max_grad_norm
        self.train_head = settings.train_head
        self.eval_batch_size = settings.eval_batch_size
        self.bf16 = settings.bf16 and data.device.type == "cuda"
        self.layers = lora_layers(model)
        self.head = head_parameters(model)
        for p in self.head.values():
            p.requires_grad_(self.train_head)

    def use_data(self, data: DataArrays) -> None:
        """Train and evaluate on `data` from now on (a worker with per-client data switches tables)."""
        self.data = data

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_trainable(self, train: frozenset[str], lr_scale: dict[str, float] | None = None
                       ) -> tuple[list[torch.nn.Parameter], list[dict]]:
        """(trainable tensors in model order, optimiser param groups): one group per trained factor
        ("a", "b", and "c" when a tri-matrix core is loaded) at lr × lr_scale[factor] (default 1),
        and the head at lr."""
        params, groups = [], {}
        for layer in self.layers.values():
            for name, p in factor_parameters(layer, ADAPTER).items():
                p.requires_grad_(name in train)
                if name in train:
                    params.append(p)
                    groups.setdefault(name, []).append(p)
        if self.train_head:
            params.extend(self.head.values())
            groups["head"] = list(self.head.values())
        scale = lr_scale or {}
        return params, [{"params": ps, "lr": self.lr * float(scale.get(name, 1.0))} for name, ps in groups.items()]

    def train_client(self, job: ClientJob) -> ClientResult:
        t0 = time.perf_counter()
        set_factors(self.model, job.start)
        set_head(self.model, job.head)
        params, groups = self._set_trainable(job.train, job.lr_scale)
        opt = make_optimizer(self.optimizer_name, groups, self.lr, self.weight_decay)
        torch.manual_seed(job.seed)                                   # dropout, per client
        self.model.train()
        losses = []
        for idx in batch_schedule(job.train_idx, job.steps, self.batch_size, job.seed):
            with self._autocast():
                loss = self.model(**self.task.batch(self.data, idx)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            opt.step()
            losses.append(loss.detach())
        ranks = {name: f.rank for name, f in job.start.items()}
        result = ClientResult(client_id=job.client_id, factors=get_factors(self.model, ranks),
                              head=get_head(self.model), num_samples=len(job.train_idx),
                              train_loss=float(torch.stack(losses).float().mean()),
                              train_time_s=0.0, steps=len(losses))
        if job.test_idx is not None and len(job.test_idx):
            ev = self.evaluate_loaded(job.test_idx)
            result.local_accuracy, result.local_loss = ev.accuracy, ev.loss
        result.train_time_s = time.perf_counter() - t0
        return result

    @torch.no_grad()
    def evaluate(self, factors, head, idx: np.ndarray, gen_idx: np.ndarray | None = None) -> EvalResult:
        set_factors(self.model, factors)
        set_head(self.model, head)
        return self.evaluate_loaded(idx, gen_idx)

    @torch.no_grad()
    def evaluate_loaded(self, idx: np.ndarray, gen_idx: np.ndarray | None = None) -> EvalResult:
        """The task's evaluation sums on rows `idx` (and generations for `gen_idx`) with the loaded adapter."""
        self.model.eval()
        return self.task.evaluate(self.model, self.data, np.asarray(idx), self.eval_batch_size, self._autocast,
                                  None if gen_idx is None else np.asarray(gen_idx))
