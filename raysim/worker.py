"""ClientWorker: a Ray actor with ONE resident base model that trains many virtual clients.

The worker builds the frozen base once (seeded, so every worker holds identical weights), keeps the
tokenised data as zero-copy numpy views from the object store, and follows the global base: the
coordinator sends it the factored base deltas it has not applied yet (`sync_base`) before any work
that depends on them. Actor calls run in submission order, so a sync sent before a train call is
applied first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import numpy as np
import ray

from raysim.aggregators.base import ClientData
from raysim.engines.base import ClientFailure, ClientJob, ClientResult, EngineSettings, EvalResult
from raysim.faults import apply_faults, corrupt_results, missed_deadline


KEEP_APPLIED = 4          # base changes a worker remembers, to evaluate at a slightly older base version


class ClientWorkerImpl:
    def __init__(self, cfg, num_labels: int, index: int, gpu_fraction: float):
        import torch

        from raysim.lora.peft_io import lora_layers, wrap_lora
        from raysim.models import build_base_model, modules_to_save, target_modules
        from raysim.tasks import task_for

        self.cfg = cfg
        self.task = task_for(cfg)
        self.index = index
        self.num_labels = num_labels
        threads = max(1, int(self.cfg.resources.cpus_per_worker))
        torch.set_num_threads(threads)
        use_cuda = gpu_fraction > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if use_cuda and gpu_fraction < 1:
            # fractional num_gpus is only a scheduling token: cap this process's memory for real
            torch.cuda.set_per_process_memory_fraction(gpu_fraction)
        model = build_base_model(self.cfg.model.name, num_labels, self.cfg.seed, task=self.task.name)
        self.model = wrap_lora(model, self.cfg.lora.max_rank(), self.cfg.lora.alpha, target_modules(self.cfg),
                               self.cfg.lora.dropout, self.cfg.seed, task_type=self.task.peft_task_type,
                               modules_to_save=modules_to_save(self.cfg)).to(self.device)
        self.layers = lora_layers(self.model)
        self.base_version = 0
        self.applied: list[tuple[int, dict]] = []        # base deltas folded in, for `_base_at`
        self.engine = None
        self.cohort = None
        self.calibration = None                     # resources.cohort_size: auto, after the first cohort

    # -- setup ------------------------------------------------------------------------------------------

    def initial_state(self):
        """(factors, head) of the freshly wrapped model: the round-0 adapter (a Kaiming, b = 0)."""
        from raysim.lora.peft_io import get_factors, get_head

        return get_factors(self.model), get_head(self.model)

    def set_data(self, arrays: dict[str, np.ndarray], per_client=None) -> int:
        """The tokenised table (all the data, or with per-client data only the global test set) and, for
        per-client data, the source this worker reads or generates its clients' examples from."""
        from raysim.engines.peft_engine import DataArrays, PeftEngine
        from raysim.tasks import task_for
        from raysim.worker_data import ClientExamples

        settings = EngineSettings.from_config(self.cfg)
        self.table = DataArrays(arrays, self.device)
        self.labels = np.asarray(arrays.get("example_labels", arrays["labels"]))   # one class/group per example
        self.examples = None if per_client is None else ClientExamples(per_client, task_for(self.cfg))
        self.engine = PeftEngine(self.model, self.table, settings, self.task)
        self.cohort = None
        if self.cfg.resources.engine == "cohort":
            from raysim.engines.cohort import CohortEngine, UnsupportedModel

            try:
                self.cohort = CohortEngine(self.model, self.table, settings, peft=self.engine)
            except UnsupportedModel as exc:           # a model the stacked layers cannot hold: PEFT engine
                import warnings

                warnings.warn(f"resources.engine: cohort unavailable ({exc}); using the peft engine")
        return os.getpid()

    def _use(self, data) -> None:
        """Point the engines at `data` (the shared table, or a stack of per-client examples)."""
        for engine in (self.engine, self.cohort):
            if engine is not None and engine.data is not data:
                engine.use_data(data)

    def _clients_table(self, cids) -> dict[int, int] | None:
        """Per-client data: stack the clients' examples into the engines' table and return each client's first
        row in it (a client's rows are local to its examples). None with pooled data: rows are global."""
        if self.examples is None:
            return None
        from raysim.engines.peft_engine import DataArrays

        table, offsets = self.examples.gather(cids)
        self.labels = np.asarray(table.get("example_labels", table["labels"]))
        self._use(DataArrays(table, self.device))
        return offsets

    def sync_base(self, deltas: list[tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]]) -> int:
        """Fold every base delta with version > ours: W_base += u @ v (nn.Linear orientation)."""
        from raysim.lora.peft_io import fold_into_base

        for version, per_module in deltas:
            if version <= self.base_version:
                continue
            for name, (u, v) in per_module.items():
                fold_into_base(self.layers[name], self._delta(u, v))
            self.applied.append((version, per_module))
            self.base_version = version
        # only the newest changes can be undone for a re-run evaluation (the last round or two): keep those
        del self.applied[:-KEEP_APPLIED]
        return self.base_version

    def _delta(self, u: np.ndarray, v: np.ndarray | None):
        """The m×n base change u @ v (u itself when dense), float64, formed on this worker's device."""
        import torch

        left = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64)).to(self.device)
        return left if v is None else left @ torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(self.device)

    def _changes_for(self, base_version: int | None, eval_delta: dict | None) -> list[tuple[float, dict]]:
        """(sign, module -> (u, v)) folds that give the base an evaluation asks for: the base of an older
        version (a re-run evaluation after a worker was lost while the next round already changed the base),
        plus a change only the global model carries (`Aggregator.evaluation_base_delta`, e.g. FlexLoRA)."""
        changes = []
        if base_version is not None and base_version < self.base_version:
            changes += [(-1.0, d) for v, d in reversed(self.applied) if v > base_version]
        if eval_delta:
            changes.append((1.0, eval_delta))
        return changes

    @contextlib.contextmanager
    def _folded(self, changes: list[tuple[float, dict]]):
        """Temporarily W_base += sign · u @ v for each change; the weights are restored bit for bit afterwards."""
        import torch

        from raysim.lora.peft_io import fold_into_base

        saved = {name: self.layers[name].get_base_layer().weight.detach().clone() for _, d in changes for name in d}
        for sign, per_module in changes:
            for name, (u, v) in per_module.items():
                fold_into_base(self.layers[name], sign * self._delta(u, v))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    self.layers[name].get_base_layer().weight.copy_(w)

    # -- work -------------------------------------------------------------------------------------------

    def train(self, jobs: list[ClientJob]) -> list[ClientResult | ClientFailure]:
        """Train the jobs (with the cohort engine together); one outcome per job, in order.

        Injected faults are applied first; a job whose aggregator asked for client-side compute gets its
        `client_hook` run on the client's own training labels.
        """
        live, out = apply_faults(jobs)
        offsets = self._clients_table(j.client_id for j in live) if live else None
        if offsets is not None:
            live = [dataclasses.replace(j, train_idx=np.asarray(j.train_idx) + offsets[j.client_id]) for j in live]
        for result in corrupt_results(live, self._train_live(live)):
            if not isinstance(result, ClientFailure):
                result.worker = self.index
                job = next(j for j in live if j.client_id == result.client_id)
                if job.client_hook is not None:
                    labels = self.labels[np.asarray(job.train_idx)]
                    result.hook_output = job.client_hook(ClientData(labels=labels, num_labels=self.num_labels))
            out[result.client_id] = result
        return [out[job.client_id] for job in jobs]

    def _train_live(self, jobs: list[ClientJob]) -> list[ClientResult | ClientFailure]:
        """The cohort engine takes what it can stack; tri-matrix jobs (CE-LoRA) go through the PEFT engine."""
        if self.cohort is None:
            return [self._train_one(job) for job in jobs]
        from raysim.engines.cohort import UnsupportedJob

        tri = [j for j in jobs if any(f.c is not None for f in j.start.values())]
        stacked = [j for j in jobs if all(f.c is None for f in j.start.values())]
        results = [self._train_one(job) for job in tri]
        try:
            return results + self._train_cohorts(stacked)
        except UnsupportedJob:
            return results + [self._train_one(j) for j in stacked]

    def _train_one(self, job: ClientJob) -> ClientResult | ClientFailure:
        """One client through the PEFT engine, unless the round's deadline passed while earlier jobs trained."""
        if job.deadline is not None and time.time() >= job.deadline:
            return missed_deadline(job.client_id)
        return self.engine.train_client(job)

    def _train_cohorts(self, jobs: list[ClientJob]) -> list[ClientResult | ClientFailure]:
        """The stackable jobs as one cohort, or with `resources.cohort_size: auto` in cohorts of the size this
        worker measured fastest on its first cohort (raysim.engines.calibrate)."""
        if self.cfg.resources.cohort_size != "auto" or not jobs:
            return self._train_split(jobs)
        import torch

        from raysim.engines.calibrate import calibrate, candidates, chunks

        if self.calibration is None:
            gpu = self.device.type == "cuda"
            self.calibration = calibrate(self._timed_cohort, jobs, candidates(gpu),
                                         too_big=(torch.cuda.OutOfMemoryError,))
        return [r for part in chunks(jobs, self.calibration.cohort_size) for r in self._train_split(part)]

    def _timed_cohort(self, jobs: list[ClientJob]) -> None:
        """One calibration call: train the cohort and wait for the device."""
        import torch

        self.cohort.train_cohort(jobs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def cohort_calibration(self) -> dict | None:
        """What `resources.cohort_size: auto` measured (the chosen size, client-steps/s per size), or None."""
        return None if self.calibration is None else self.calibration.as_dict()

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

    def evaluate(self, factors, head, idx: np.ndarray, base_version: int | None = None,
                 gen_idx: np.ndarray | None = None, eval_delta: dict | None = None) -> EvalResult:
        """The task's evaluation sums on rows `idx` (generations for `gen_idx`); at an older base version if
        given, with the global model's own base change if any (see `_changes_for`)."""
        self._use(self.table)
        changes = self._changes_for(base_version, eval_delta)
        if not changes:
            return self.engine.evaluate(factors, head, np.asarray(idx), gen_idx)
        with self._folded(changes):
            return self.engine.evaluate(factors, head, np.asarray(idx), gen_idx)

    def evaluate_clients(self, items: list[tuple]) -> list[tuple[int, EvalResult]]:
        """Personalised evaluation: each (client id, factors, head, local test rows) with that client's model."""
        offsets = self._clients_table(cid for cid, *_ in items) if items else None
        first = (lambda cid: 0) if offsets is None else offsets.__getitem__
        return [(cid, self.engine.evaluate(factors, head, np.asarray(idx) + first(cid)))
                for cid, factors, head, idx in items]

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
