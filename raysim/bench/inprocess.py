"""In-process throughput probes (no Ray): the PEFT engine, the cohort engine at a cohort size K, and
the compute floor (a plain PyTorch loop over the same client-steps)."""

from __future__ import annotations

import time


class Bench:
    """The workload's model, data and clients in this process."""

    def __init__(self, cfg, device, no_dropout: bool = False):
        import torch

        from raysim.engines.peft_engine import DataArrays
        from raysim.lora.peft_io import get_factors, get_head, wrap_lora
        from raysim.models import build_base_model, modules_to_save, target_modules
        from raysim.runner import prepare_data
        from raysim.tasks import task_for

        self.cfg = cfg
        self.device = device
        self.task = task_for(cfg)
        raw, partition = prepare_data(cfg)
        self.arrays = self.task.arrays(raw)
        self.client_train = partition["client_train"]
        model = build_base_model(cfg.model.name, int(raw.num_labels), cfg.seed, task=self.task.name)
        self.model = wrap_lora(model, cfg.lora.max_rank(), cfg.lora.alpha, target_modules(cfg), cfg.lora.dropout,
                               cfg.seed, task_type=self.task.peft_task_type,
                               modules_to_save=modules_to_save(cfg)).to(device)
        if no_dropout:                   # every dropout of the base (hidden, attention, classifier) off
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        self.data = DataArrays(self.arrays, device)
        self.factors = get_factors(self.model)
        self.head = get_head(self.model)
        self.bf16 = cfg.model.dtype == "bfloat16" and device.type == "cuda"
        self.torch = torch

    def jobs(self, n: int, round_: int = 1):
        from raysim.engines.base import ClientJob
        from raysim.seeds import derive_seed

        out = []
        for i in range(n):
            cid = i % len(self.client_train)
            out.append(ClientJob(client_id=cid, round=round_, seed=derive_seed(self.cfg.seed, round_, cid),
                                 train_idx=self.client_train[cid], test_idx=None, start=self.factors,
                                 head=self.head, train=frozenset("ab"), steps=self.cfg.train.local_steps))
        return out

    def settings(self):
        from raysim.engines.base import EngineSettings

        return EngineSettings.from_config(self.cfg)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def timed(fn, work_per_call: int, min_time_s: float, min_calls: int = 1) -> float:
    """Client-steps/s of `fn` (each call does `work_per_call` client-steps), after one warm-up call."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_time_s:
        fn()
        calls += 1
    return calls * work_per_call / (time.perf_counter() - t0)


def measure_peft(b: Bench, n_clients: int, min_time_s: float) -> float:
    from raysim.engines.peft_engine import PeftEngine

    engine = PeftEngine(b.model, b.data, b.settings(), b.task)
    jobs = b.jobs(n_clients)

    def run():
        for job in jobs:
            engine.train_client(job)
        b.sync()

    return timed(run, sum(j.steps for j in jobs), min_time_s)


def measure_cohort(b: Bench, k: int, n_clients: int, min_time_s: float) -> float:
    """Whole cohorts of K only: the clients rounded down to a multiple of K, at least one cohort."""
    from raysim.engines.cohort import CohortEngine

    engine = CohortEngine(b.model, b.data, b.settings(), task=b.task)
    jobs = b.jobs(max(k, n_clients - n_clients % k))

    def run():
        for i in range(0, len(jobs), k):
            engine.train_cohort(jobs[i:i + k])
        b.sync()

    return timed(run, sum(j.steps for j in jobs), min_time_s)


def calibrate_cohort(b: Bench):
    """What `resources.cohort_size: auto` would choose here: raysim.engines.calibrate on a cohort engine
    over enough of the workload's clients to fill the largest candidate."""
    from raysim.engines.calibrate import calibrate, candidates
    from raysim.engines.cohort import CohortEngine

    engine = CohortEngine(b.model, b.data, b.settings(), task=b.task)
    sizes = candidates(b.device.type == "cuda")
    return calibrate(lambda jobs: (engine.train_cohort(jobs), b.sync()), b.jobs(max(sizes)), sizes,
                     too_big=(b.torch.cuda.OutOfMemoryError,))


def measure_floor(b: Bench, n_clients: int, min_time_s: float) -> float:
    """A plain PyTorch loop over the same client-steps: no engine, no Ray, no bookkeeping."""
    import contextlib

    import torch

    from raysim.lora.peft_io import set_factors, set_head

    model = b.model
    params = _trainable_parameters(model)
    jobs = b.jobs(n_clients)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if b.bf16 else contextlib.nullcontext
    schedules = [_schedule(b, job) for job in jobs]
    t = b.cfg.train

    def run():
        model.train()
        for job, sched in zip(jobs, schedules):
            set_factors(model, job.start)
            set_head(model, job.head)
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
            torch.manual_seed(job.seed)
            for batch in sched:
                with autocast():
                    loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        b.sync()

    return timed(run, sum(j.steps for j in jobs), min_time_s)


def _trainable_parameters(model) -> list:
    """The LoRA A/B weights and the classifier head, with gradients on."""
    from raysim.lora.peft_io import head_parameters, lora_layers

    params = [p for layer in lora_layers(model).values()
              for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    params += list(head_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    return params


def _schedule(b: Bench, job) -> list:
    """The job's mini-batches (the engines' own schedule), built and moved to the device ahead of time."""
    from raysim.engines.base import batch_schedule

    batches = batch_schedule(job.train_idx, job.steps, b.cfg.train.batch_size, job.seed)
    return [b.task.batch(b.data, idx) for idx in batches]
