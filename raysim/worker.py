"""ClientWorker: a Ray actor with ONE resident base model that trains many virtual clients.

The worker builds the frozen base once (seeded, so every worker holds identical weights), keeps the
tokenised data as zero-copy numpy views from the object store, and follows the global base: the
coordinator sends it the factored base deltas it has not applied yet (`sync_base`) before any work
that depends on them. Actor calls run in submission order, so a sync sent before a train call is
applied first.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import ray

from raysim.engines.base import ClientJob, ClientResult, EvalResult


@dataclasses.dataclass
class ClientFailure:
    """One job of a cohort task that did not finish (the others in the task did).

    simulated: fault injection (faults.drop_rate), never retried; retryable: e.g. out of GPU memory
    even alone, worth another try on another worker.
    """

    client_id: int
    error: str
    simulated: bool = False
    retryable: bool = False


class ClientWorkerImpl:
    def __init__(self, cfg: dict[str, Any], num_labels: int, index: int, gpu_fraction: float):
        import torch

        from raysim.config import ExperimentConfig
        from raysim.lora.peft_io import lora_layers, wrap_lora
        from raysim.models import build_base_model

        self.cfg = ExperimentConfig.model_validate(cfg)
        self.index = index
        self.num_labels = num_labels
        threads = max(1, int(self.cfg.resources.cpus_per_worker))
        torch.set_num_threads(threads)
        use_cuda = gpu_fraction > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if use_cuda and gpu_fraction < 1:
            # fractional num_gpus is only a scheduling token: cap this process's memory for real
            torch.cuda.set_per_process_memory_fraction(gpu_fraction)
        model = build_base_model(self.cfg.model.name, num_labels, self.cfg.seed)
        self.model = wrap_lora(model, self.cfg.lora.max_rank(), self.cfg.lora.alpha, self.cfg.lora.target_modules,
                               self.cfg.lora.dropout, self.cfg.seed).to(self.device)
        self.layers = lora_layers(self.model)
        self.base_version = 0
        self.engine = None

    # -- setup ------------------------------------------------------------------------------------------

    def initial_state(self):
        """(factors, head) of the freshly wrapped model: the round-0 adapter (a Kaiming, b = 0)."""
        from raysim.lora.peft_io import get_factors, get_head

        return get_factors(self.model), get_head(self.model)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: tuple(layer.get_base_layer().weight.shape) for name, layer in self.layers.items()}

    def set_data(self, arrays: dict[str, np.ndarray]) -> int:
        from raysim.engines.peft_engine import DataArrays, PeftEngine

        t = self.cfg.train
        data = DataArrays(arrays, self.device)
        self.labels = np.asarray(arrays["labels"])
        self.engine = PeftEngine(self.model, data, optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                 batch_size=t.batch_size, max_grad_norm=t.max_grad_norm,
                                 train_head=self.cfg.lora.train_head, eval_batch_size=self.cfg.eval.batch_size,
                                 bf16=self.cfg.model.dtype == "bfloat16")
        self.cohort = None
        if self.cfg.resources.engine == "cohort":
            from raysim.engines.cohort import CohortEngine

            try:
                self.cohort = CohortEngine(self.model, data, optimizer=t.optimizer, lr=t.lr,
                                           weight_decay=t.weight_decay, batch_size=t.batch_size,
                                           max_grad_norm=t.max_grad_norm, train_head=self.cfg.lora.train_head,
                                           eval_batch_size=self.cfg.eval.batch_size,
                                           bf16=self.cfg.model.dtype == "bfloat16", peft=self.engine)
            except NotImplementedError as exc:        # a model the stacked layers cannot hold: PEFT engine
                import warnings

                warnings.warn(f"resources.engine: cohort unavailable ({exc}); using the peft engine")
        return os.getpid()

    def sync_base(self, deltas: list[tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]]) -> int:
        """Fold every base delta with version > ours: W_base += u @ v (nn.Linear orientation)."""
        import torch

        from raysim.lora.peft_io import fold_into_base

        for version, per_module in deltas:
            if version <= self.base_version:
                continue
            for name, (u, v) in per_module.items():
                r = torch.from_numpy(np.asarray(u, dtype=np.float64) @ np.asarray(v, dtype=np.float64))
                fold_into_base(self.layers[name], r)
            self.base_version = version
        return self.base_version

    # -- work -------------------------------------------------------------------------------------------

    def train(self, jobs: list[ClientJob]) -> list[ClientResult | ClientFailure]:
        """Train the jobs; with the cohort engine together (see `_train_cohort`), else one by one."""
        if getattr(self, "cohort", None) is not None:
            results = self._train_cohort(jobs)
        else:
            results = [self.engine.train_client(job) for job in jobs]
        for job, result in zip(jobs, results):
            if isinstance(result, ClientFailure):
                continue
            result.worker = self.index
            if job.descriptor:          # CE-LoRA: the client's label histogram, computed where its data is
                from raysim.aggregators.celora import label_descriptor

                result.descriptor = label_descriptor(self.labels[np.asarray(job.train_idx)], self.num_labels)
        return results

    def _train_cohort(self, jobs: list[ClientJob]) -> list[ClientResult | ClientFailure]:
        """A cohort task: per-job outcomes, so one dropped client does not fail the others.

        Fault injection: `fail` jobs are reported as simulated failures; the cohort waits for its
        slowest `sleep_s`. Jobs with a tri-matrix core (CE-LoRA) go through the PEFT engine.
        """
        from raysim.engines.cohort import UnsupportedJob

        out: dict[int, ClientResult | ClientFailure] = {}
        for job in jobs:
            if job.fail:
                out[job.client_id] = ClientFailure(job.client_id, f"client {job.client_id} dropped out "
                                                   "(faults.drop_rate)", simulated=True)
        live = [j for j in jobs if not j.fail]
        if live and max(j.sleep_s for j in live) > 0:
            time.sleep(max(j.sleep_s for j in live))
        tri = {j.client_id for j in live if any(f.c is not None for f in j.start.values())}
        stacked = [j for j in live if j.client_id not in tri]
        for job in live:
            if job.client_id in tri:
                out[job.client_id] = self.engine.train_client(dataclasses.replace(job, sleep_s=0.0))
        try:
            results = self._train_split(stacked)
        except UnsupportedJob:
            results = [self.engine.train_client(dataclasses.replace(j, sleep_s=0.0)) for j in stacked]
        out.update({r.client_id: r for r in results})
        return [out[job.client_id] for job in jobs]

    def _train_split(self, jobs: list[ClientJob]) -> list[ClientResult | ClientFailure]:
        """Train a cohort; on CUDA out-of-memory split it in halves and retry (never fatal to the run)."""
        import torch

        if not jobs:
            return []
        try:
            return self.cohort.train_cohort(jobs)
        except torch.cuda.OutOfMemoryError as exc:
            error = f"out of GPU memory: {exc}".splitlines()[0]
        # outside the except block: the failed attempt's tensors are unreachable now
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.oom_splits = getattr(self, "oom_splits", 0) + 1
        if len(jobs) == 1:
            return [ClientFailure(jobs[0].client_id, error, retryable=True)]
        half = len(jobs) // 2
        return self._train_split(jobs[:half]) + self._train_split(jobs[half:])

    def evaluate(self, factors, head, idx: np.ndarray) -> EvalResult:
        return self.engine.evaluate(factors, head, np.asarray(idx))

    def export_adapter(self, factors, head, base_model_name: str) -> dict[str, bytes]:
        """The adapter as a PEFT directory, returned as {filename: bytes} (the driver writes it)."""
        import tempfile
        from pathlib import Path

        from raysim.lora.factors import fold_core
        from raysim.lora.peft_io import set_factors, set_head

        set_factors(self.model, fold_core(factors))     # a tri-matrix core is saved folded into B
        set_head(self.model, head)
        self.model.peft_config["default"].base_model_name_or_path = base_model_name
        with tempfile.TemporaryDirectory() as d:
            self.model.save_pretrained(d)
            return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}

    def ping(self) -> float:
        return time.time()


ClientWorker = ray.remote(max_restarts=0, max_task_retries=0)(ClientWorkerImpl)
