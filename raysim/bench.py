"""`raysim bench`: throughput of the training engines on fixed workloads (DESIGN.md §6, §8).

Four measurements, all on the same clients, data and hyper-parameters:

1. engine `peft`: one resident PEFT model, clients one after another, in this process (no Ray);
2. engine `cohort` at several cohort sizes K, in this process;
3. the compute floor: the same client-steps in a plain PyTorch loop (one PEFT model, a fresh AdamW
   per client, forward/backward/step — no raysim engine, no Ray, no simulation);
4. end to end: the real runner (Ray, coordinator, workers, aggregation, metrics) on the workload's
   federation for each engine; steady-state round time, client-steps/s, start-up and teardown.

Throughput unit: client-steps per second (one optimizer step of one client). On CPU every
in-process measurement runs on one thread, like a worker with `cpus_per_worker: 1`.

`overhead_ratio` = steady-state end-to-end round time ÷ (the round's client-steps at the floor's
rate ÷ parallel workers); parallel workers = `num_workers` on CPU (each has its own core), 1 on a
GPU (the workers share it). On CPU ≤ 1.15 is the target; on a GPU a value < 1 means the simulation
beats the one-client-at-a-time floor. `overhead_vs_engine` divides by the in-process rate of the
end-to-end engine instead, i.e. what Ray and the simulation add.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

WORKLOADS: dict[str, dict[str, Any]] = {
    # DESIGN.md §8: random bert-tiny, synthetic 100 clients × 64 examples × 32 tokens, 4 labels,
    # 10 clients per round, 1 local epoch = 4 steps of batch 16, AdamW 5e-4, FedIT, 20 rounds, 2 workers.
    "tiny": {
        "device": "cpu",
        "ks": [1, 2, 4, 8, 16],
        "engine_clients": 16,
        "min_time_s": 1.0,
        "e2e_rounds": 20,
        "config": {
            "name": "bench-tiny", "seed": 0,
            "model": {"name": "random:bert-tiny", "max_length": 32, "dtype": "float32"},
            "data": {"source": "synthetic:text-cls", "test_fraction": 0.2, "local_test_fraction": 0.0,
                     "synthetic": {"num_examples": 8000, "seq_len": 32, "vocab_size": 1000, "num_labels": 4},
                     "partition": {"scheme": "iid", "min_samples": 4}},
            "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 20},
            "train": {"local_steps": 4, "batch_size": 16, "lr": 5.0e-4, "optimizer": "adamw"},
            "lora": {"rank": 8, "alpha": 16, "target_modules": ["query", "value"], "train_head": True},
            "aggregator": {"name": "fedit"},
            "resources": {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0, "cohort_size": 8},
            "eval": {"every": 1000},
            "output": {"checkpoint_every": 0},
        },
    },
}


def _gpu_workload(arch: str, rounds: int) -> dict[str, Any]:
    """GPU workloads: MiniLM-L6 / BERT-base shapes, random weights, batch 16 × 128 tokens, LoRA r=8 on
    q/v, bf16; 256 synthetic clients × 64 examples, 128 per round, 4 local steps, 2 workers à 0.5 GPU."""
    cfg = json.loads(json.dumps(WORKLOADS["tiny"]["config"]))
    cfg.update(name=f"bench-{arch}", model={"name": f"random:{arch}", "max_length": 128, "dtype": "bfloat16"})
    cfg["data"]["synthetic"] = {"num_examples": 20480, "seq_len": 128, "vocab_size": 30522, "num_labels": 4}
    cfg["federation"] = {"num_clients": 256, "clients_per_round": 128, "rounds": rounds}
    cfg["resources"].update(gpus_per_worker=0.5, cohort_size=64)
    return {"device": "cuda", "ks": [1, 8, 16, 32, 64], "engine_clients": 64, "min_time_s": 3.0,
            "e2e_rounds": rounds, "config": cfg}


WORKLOADS["minilm"] = _gpu_workload("minilm", 10)
WORKLOADS["bert-base"] = _gpu_workload("bert-base", 6)


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "load_average_1m": round(os.getloadavg()[0], 2)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------------------- setup


class Bench:
    """The workload's model, data and clients in this process (no Ray)."""

    def __init__(self, cfg, device, no_dropout: bool = False):
        import torch

        from raysim.coordinator import tokenize_for_model
        from raysim.engines.peft_engine import DataArrays
        from raysim.lora.peft_io import get_factors, get_head, wrap_lora
        from raysim.models import build_base_model
        from raysim.runner import prepare_data

        self.cfg = cfg
        self.device = device
        raw, partition = prepare_data(cfg)
        self.arrays = tokenize_for_model(raw, cfg)
        self.client_train = partition["client_train"]
        self.num_labels = int(raw.num_labels)
        model = build_base_model(cfg.model.name, self.num_labels, cfg.seed)
        self.model = wrap_lora(model, cfg.lora.max_rank(), cfg.lora.alpha, cfg.lora.target_modules,
                               cfg.lora.dropout, cfg.seed).to(device)
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
        from raysim.sampling import derive_seed

        out = []
        for i in range(n):
            cid = i % len(self.client_train)
            out.append(ClientJob(client_id=cid, round=round_, seed=derive_seed(self.cfg.seed, round_, cid),
                                 train_idx=self.client_train[cid], test_idx=None, start=self.factors,
                                 head=self.head, train=frozenset("ab"), steps=self.cfg.train.local_steps))
        return out

    def engine_kwargs(self) -> dict[str, Any]:
        t = self.cfg.train
        return dict(optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, batch_size=t.batch_size,
                    max_grad_norm=t.max_grad_norm, train_head=self.cfg.lora.train_head,
                    eval_batch_size=self.cfg.eval.batch_size, bf16=self.cfg.model.dtype == "bfloat16")

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def _timed(fn, work_per_call: int, min_time_s: float, min_calls: int = 1) -> float:
    """Client-steps/s of `fn` (each call does `work_per_call` client-steps), after one warm-up call."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_time_s:
        fn()
        calls += 1
    return calls * work_per_call / (time.perf_counter() - t0)


def measure_peft(b: Bench, n_clients: int, min_time_s: float) -> float:
    from raysim.engines.peft_engine import PeftEngine

    engine = PeftEngine(b.model, b.data, **b.engine_kwargs())
    jobs = b.jobs(n_clients)

    def run():
        for job in jobs:
            engine.train_client(job)
        b.sync()

    return _timed(run, sum(j.steps for j in jobs), min_time_s)


def measure_cohort(b: Bench, k: int, n_clients: int, min_time_s: float) -> float:
    from raysim.engines.cohort import CohortEngine

    engine = CohortEngine(b.model, b.data, **b.engine_kwargs())
    jobs = b.jobs(max(k, n_clients - n_clients % k if n_clients >= k else k))

    def run():
        for i in range(0, len(jobs), k):
            engine.train_cohort(jobs[i:i + k])
        b.sync()

    return _timed(run, sum(j.steps for j in jobs), min_time_s)


def measure_floor(b: Bench, n_clients: int, min_time_s: float) -> float:
    """A plain PyTorch loop over the same client-steps: no engine, no Ray, no bookkeeping."""
    import contextlib

    import numpy as np
    import torch

    from raysim.engines.base import batch_schedule
    from raysim.lora.peft_io import head_parameters, lora_layers, set_factors, set_head

    model = b.model
    layers = lora_layers(model)
    params = [p for layer in layers.values() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    params += list(head_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    jobs = b.jobs(n_clients)
    t = b.cfg.train
    ids = torch.from_numpy(np.asarray(b.arrays["input_ids"], dtype=np.int64))
    mask = torch.from_numpy(np.asarray(b.arrays["attention_mask"], dtype=np.int64))
    labels = torch.from_numpy(np.asarray(b.arrays["labels"], dtype=np.int64))
    if b.device.type == "cuda":
        ids, mask, labels = ids.to(b.device), mask.to(b.device), labels.to(b.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if b.bf16 else contextlib.nullcontext
    schedules = [[torch.from_numpy(np.asarray(i, dtype=np.int64)).to(b.device)
                  for i in batch_schedule(j.train_idx, j.steps, t.batch_size, j.seed)] for j in jobs]

    def run():
        model.train()
        for job, sched in zip(jobs, schedules):
            set_factors(model, job.start)
            set_head(model, job.head)
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
            torch.manual_seed(job.seed)
            for idx in sched:
                with autocast():
                    loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        b.sync()

    return _timed(run, sum(j.steps for j in jobs), min_time_s)


# ----------------------------------------------------------------------------------------- end to end


def run_e2e(cfg, engine: str, rounds: int, address: str | None, verbose: bool) -> dict[str, Any]:
    """The real runner on the workload; round times from inside the coordinator, wall times here."""
    import pyarrow.parquet as pq

    from raysim.config import validate_config
    from raysim.runner import prepare_data, run_experiment

    raw_cfg = cfg.to_yaml_dict()
    raw_cfg["resources"]["engine"] = engine
    raw_cfg["federation"]["rounds"] = rounds
    raw_cfg["eval"]["every"] = max(rounds, 1)
    ecfg = validate_config(raw_cfg)
    marks: list[float] = []
    with tempfile.TemporaryDirectory(prefix="raysim-bench-") as d:
        t0 = time.perf_counter()
        prepared = prepare_data(ecfg)
        summary = run_experiment(ecfg, Path(d) / "run", address=address, verbose=verbose, progress=False,
                                 prepared=prepared, on_round=lambda row, ck: marks.append(time.perf_counter()))
        t_end = time.perf_counter()
        rows = pq.read_table(Path(d) / "run" / "rounds.parquet").to_pylist()
    times = [r["round_time_s"] for r in rows]
    # steady state: skip 2 warm-up rounds and the last one (it holds the only global evaluation)
    steady = times[2:-1] if len(times) > 3 else times[1:] or times
    round_time = statistics.median(steady)
    steps = ecfg.federation.clients_per_round * ecfg.train.local_steps
    failed = sum(r["clients_failed"] for r in rows)
    return {
        "engine": engine, "rounds": len(rows), "round_time_s": round_time,
        "round_times_s": [round(x, 4) for x in times],
        "client_steps_per_round": steps,
        "client_steps_per_s": steps / round_time,
        "startup_s": marks[0] - t0 - times[0],
        "teardown_s": t_end - marks[-1],
        "total_s": t_end - t0,
        "clients_failed": failed,
        "final_accuracy": rows[-1]["accuracy"],
        "gpus_per_worker": summary.get("gpus_per_worker") if isinstance(summary, dict) else None,
    }


# ----------------------------------------------------------------------------------------- scale


def _scale_config() -> dict[str, Any]:
    """The tiny workload stretched to 10,000 clients of ~8 examples, 100 per round, one local step."""
    cfg = json.loads(json.dumps(WORKLOADS["tiny"]["config"]))
    cfg["name"] = "bench-scale-10k"
    cfg["data"].update(test_fraction=0.02)
    cfg["data"]["synthetic"]["num_examples"] = 82000
    cfg["federation"] = {"num_clients": 10000, "clients_per_round": 100, "rounds": 5}
    cfg["train"].update(local_steps=1, batch_size=8)
    cfg["resources"]["cohort_size"] = 25
    return cfg


def _peak_rss_mib(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a process, MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_scale(engine: str = "cohort", rounds: int | None = None, clients: int | None = None,
              log=print) -> dict[str, Any]:
    """10,000 virtual clients (100 per round) on synthetic data; peak RSS of the driver and of the
    coordinator actor (its process is found among this driver's descendants, i.e. this Ray instance)."""
    import resource
    import threading

    import psutil

    from raysim.config import validate_config
    from raysim.runner import prepare_data, run_experiment

    raw = _scale_config()
    raw["resources"]["engine"] = engine
    if rounds:
        raw["federation"]["rounds"] = rounds
    if clients:
        raw["federation"]["num_clients"] = clients
    cfg = validate_config(raw)
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def watch():
        me = psutil.Process()
        while not stop.wait(0.5):
            try:
                for child in me.children(recursive=True):
                    name = " ".join(child.cmdline()[:1])
                    role = ("coordinator" if name.startswith("ray::CoordinatorImpl") else
                            "worker" if name.startswith("ray::ClientWorkerImpl") else None)
                    if role:
                        rss = _peak_rss_mib(child.pid) or 0.0
                        peaks[f"{role}:{child.pid}"] = max(peaks.get(f"{role}:{child.pid}", 0.0), rss)
            except (psutil.Error, OSError):
                continue

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysim-scale-") as d:
        prepared = prepare_data(cfg)
        log(f"[bench] scale: {cfg.federation.num_clients} clients prepared in {time.perf_counter() - t0:.1f} s")
        summary = run_experiment(cfg, Path(d) / "run", progress=False, prepared=prepared)
        import pyarrow.parquet as pq

        rows = pq.read_table(Path(d) / "run" / "rounds.parquet").to_pylist()
    stop.set()
    thread.join()
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    coord = max((v for k, v in peaks.items() if k.startswith("coordinator")), default=None)
    workers = [v for k, v in peaks.items() if k.startswith("worker")]
    out = {
        "workload": "scale-10k", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "engine": engine,
        "num_clients": cfg.federation.num_clients, "clients_per_round": cfg.federation.clients_per_round,
        "rounds": len(rows), "total_s": time.perf_counter() - t0,
        "round_times_s": [round(r["round_time_s"], 3) for r in rows],
        "clients_failed": sum(r["clients_failed"] for r in rows),
        "peak_rss_mib": {"driver": driver, "coordinator": coord,
                         "driver_plus_coordinator": driver + (coord or 0.0),
                         "workers_max": max(workers) if workers else None},
        "status": summary.get("status") if isinstance(summary, dict) else None,
    }
    out["targets"] = {"driver_plus_coordinator_rss_lt_2GiB": out["peak_rss_mib"]["driver_plus_coordinator"] < 2048}
    log(f"[bench] scale: {len(rows)} rounds, peak RSS driver {driver:.0f} MiB, coordinator "
        f"{coord if coord is not None else float('nan'):.0f} MiB, workers ≤ {out['peak_rss_mib']['workers_max']} MiB")
    return out


# ----------------------------------------------------------------------------------------- driver


def run_bench(workload: str, *, ks: list[int] | None = None, e2e_engines: list[str] | None = None,
              rounds: int | None = None, engine_clients: int | None = None, min_time_s: float | None = None,
              device: str = "auto", address: str | None = None, verbose: bool = False,
              no_dropout: bool = False, log=print) -> dict[str, Any]:
    import torch

    from raysim.config import validate_config

    spec = WORKLOADS[workload]
    want = spec["device"] if device == "auto" else device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"workload {workload!r} needs a CUDA GPU (use --device cpu to run it on the CPU anyway)")
    dev = torch.device(want)
    raw_cfg = json.loads(json.dumps(spec["config"]))
    if dev.type == "cpu":
        raw_cfg["model"]["dtype"] = "float32"
        raw_cfg["resources"]["gpus_per_worker"] = 0
    cfg = validate_config(raw_cfg)
    ks = ks or spec["ks"]
    n_clients = engine_clients or spec["engine_clients"]
    min_time = spec["min_time_s"] if min_time_s is None else min_time_s
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    out: dict[str, Any] = {
        "workload": workload,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "device": str(dev),
        "settings": {"model": cfg.model.name, "dtype": cfg.model.dtype if dev.type == "cuda" else "float32",
                     "batch_size": cfg.train.batch_size, "max_length": cfg.model.max_length,
                     "local_steps": cfg.train.local_steps, "rank": cfg.lora.rank,
                     "target_modules": cfg.lora.target_modules, "engine_clients": n_clients,
                     "threads": 1 if dev.type == "cpu" else threads,
                     "base_dropout": "off (in-process measurements)" if no_dropout else "as configured (0.1)"},
    }
    try:
        t0 = time.perf_counter()
        b = Bench(cfg, dev, no_dropout=no_dropout)
        log(f"[bench] {workload}: model and data ready in {time.perf_counter() - t0:.1f} s on {dev}")
        floor = measure_floor(b, n_clients, min_time)
        log(f"[bench] floor (plain loop)       {floor:10.1f} client-steps/s")
        peft = measure_peft(b, n_clients, min_time)
        log(f"[bench] peft                      {peft:10.1f} client-steps/s")
        by_k = {}
        for k in ks:
            by_k[k] = measure_cohort(b, k, max(n_clients, k), min_time)
            log(f"[bench] cohort K={k:<4d}               {by_k[k]:10.1f} client-steps/s  ({by_k[k] / peft:.2f}x peft)")
        best_k = max(by_k, key=by_k.get)
        del b
    finally:
        torch.set_num_threads(threads)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["floor_client_steps_per_s"] = floor
    out["engines"] = {
        "peft": {"client_steps_per_s": peft},
        "cohort": {"client_steps_per_s": by_k[best_k], "best_k": best_k,
                   "by_k": {str(k): v for k, v in by_k.items()},
                   "speedup_vs_peft": {str(k): v / peft for k, v in by_k.items()}},
    }
    e2e_engines = ["peft", "cohort"] if e2e_engines is None else e2e_engines
    if no_dropout and e2e_engines:
        log("[bench] --no-dropout changes the in-process model only; the end-to-end runs keep dropout")
    rounds = rounds or spec["e2e_rounds"]
    parallel = cfg.resources.num_workers if dev.type == "cpu" else 1
    out["e2e"] = {}
    for engine in e2e_engines:
        log(f"[bench] end to end, engine {engine}: {rounds if engine == 'cohort' or dev.type == 'cpu' else min(rounds, 4)} rounds × {cfg.federation.clients_per_round} clients "
            f"× {cfg.train.local_steps} steps, {cfg.resources.num_workers} workers")
        # the PEFT engine is slow on a GPU (that is the point): fewer rounds suffice for its steady state
        n_rounds = rounds if engine == "cohort" or dev.type == "cpu" else min(rounds, 4)
        res = run_e2e(cfg, engine, n_rounds, address, verbose)
        ideal = res["client_steps_per_round"] / (floor * parallel)
        res["overhead_ratio"] = res["round_time_s"] / ideal
        in_proc = peft if engine == "peft" else by_k.get(min(cfg.resources.cohort_size, max(by_k)), by_k[best_k])
        res["overhead_vs_engine"] = res["round_time_s"] / (res["client_steps_per_round"] / (in_proc * parallel))
        out["e2e"][engine] = res
        out["engines"][engine]["e2e_client_steps_per_s"] = res["client_steps_per_s"]
        log(f"[bench]   steady round {res['round_time_s']:.3f} s  = {res['client_steps_per_s']:.1f} client-steps/s; "
            f"overhead ratio {res['overhead_ratio']:.2f}; start-up {res['startup_s']:.1f} s, "
            f"teardown {res['teardown_s']:.1f} s")
    if out["e2e"]:
        main = out["e2e"].get("cohort") or next(iter(out["e2e"].values()))
        out["overhead_ratio"] = main["overhead_ratio"]
        out["e2e_engine"] = main["engine"]
    else:
        out["overhead_ratio"] = None
    out["targets"] = targets(out)
    return out


def targets(out: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, evaluated on this result (None where not measured)."""
    t: dict[str, Any] = {}
    peft = out["engines"]["peft"]["client_steps_per_s"]
    by_k = {int(k): v for k, v in out["engines"]["cohort"]["by_k"].items()}
    e2e = out.get("e2e", {})
    if out["device"] == "cpu":
        t["cohort_ge_1.0x_peft_every_k"] = all(v >= peft for v in by_k.values())
        big = [v for k, v in by_k.items() if k >= 8]
        t["cohort_ge_1.1x_peft_k_ge_8"] = all(v >= 1.1 * peft for v in big) if big else None
        if "cohort" in e2e:
            t["round_time_le_1.15x_floor_per_worker"] = e2e["cohort"]["overhead_ratio"] <= 1.15
            t["startup_plus_teardown_le_4s"] = e2e["cohort"]["startup_s"] + e2e["cohort"]["teardown_s"] <= 4.0
    else:
        t["cohort_ge_10x_peft"] = max(by_k.values()) >= 10 * peft
        if "cohort" in e2e:
            t["e2e_ge_1200_client_steps_per_s"] = e2e["cohort"]["client_steps_per_s"] >= 1200
    return t


def format_table(out: dict[str, Any]) -> str:
    lines = [f"raysim bench — workload {out['workload']} on {out['device']} "
             f"({out['machine'].get('gpu') or out['machine'].get('cpu', '?')}), {out['date']}",
             f"{'measurement':34s} {'client-steps/s':>15s} {'vs peft':>8s}"]
    peft = out["engines"]["peft"]["client_steps_per_s"]
    lines.append(f"{'floor (plain loop, no Ray)':34s} {out['floor_client_steps_per_s']:15.1f} "
                 f"{out['floor_client_steps_per_s'] / peft:7.2f}x")
    lines.append(f"{'engine peft (in process)':34s} {peft:15.1f} {1.0:7.2f}x")
    for k, v in out["engines"]["cohort"]["by_k"].items():
        lines.append(f"{'engine cohort K=' + k + ' (in process)':34s} {v:15.1f} {v / peft:7.2f}x")
    for engine, res in out.get("e2e", {}).items():
        lines.append(f"{'end to end, ' + engine:34s} {res['client_steps_per_s']:15.1f} "
                     f"{res['client_steps_per_s'] / peft:7.2f}x   round {res['round_time_s']:.3f} s, "
                     f"overhead ratio {res['overhead_ratio']:.2f}, start-up {res['startup_s']:.1f} s, "
                     f"teardown {res['teardown_s']:.1f} s")
    for name, ok in out.get("targets", {}).items():
        lines.append(f"target {name}: {'met' if ok else ('not measured' if ok is None else 'NOT met')}")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.workload == "aggregators":
        from raysim.aggbench import format_aggregator_table, time_aggregators

        rows = time_aggregators(num_clients=args.clients or 100)
        print(format_aggregator_table(rows))
        _write_json(args.json, {"workload": "aggregators", "rows": rows})
        return 0
    if args.workload == "scale-10k":
        out = run_scale(rounds=args.rounds, clients=args.clients, log=log)
        print(json.dumps(out["peak_rss_mib"], indent=2))
        _write_json(args.json, out)
        return 0
    ks = [int(x) for x in args.ks.split(",")] if args.ks else None
    engines = [] if args.skip_e2e else ([e for e in args.e2e_engines.split(",") if e] if args.e2e_engines else None)
    out = run_bench(args.workload, ks=ks, e2e_engines=engines, rounds=args.rounds, engine_clients=args.clients,
                    min_time_s=args.min_time, device=args.device, address=args.address, verbose=args.verbose,
                    no_dropout=args.no_dropout, log=log)
    print(format_table(out))
    _write_json(args.json, out)
    return 0


def _write_json(path: str | None, out: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
        print(f"wrote {path}")


def _json_default(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser("bench", help="throughput of the training engines (client-steps/s), JSON + table")
    p.add_argument("--workload", choices=sorted(WORKLOADS) + ["scale-10k", "aggregators"],
                   default="tiny", help="tiny (CPU), minilm, bert-base (GPU); DESIGN.md §8; scale-10k: 10,000 "
                   "clients, 100 per round, peak RSS of driver and coordinator; aggregators: server seconds "
                   "per round of every aggregator for 100 clients of a BERT-base adapter (r=16, q/v, 12 layers)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--ks", help="comma-separated cohort sizes to measure (default per workload)")
    p.add_argument("--e2e-engines", help="comma-separated engines for the end-to-end runs (default peft,cohort)")
    p.add_argument("--skip-e2e", action="store_true", help="only the in-process measurements")
    p.add_argument("--rounds", type=int, help="end-to-end rounds (default per workload)")
    p.add_argument("--clients", type=int, help="clients per in-process measurement (default per workload; "
                   "scale-10k: the number of virtual clients)")
    p.add_argument("--min-time", type=float, help="seconds per in-process measurement (default per workload)")
    p.add_argument("--no-dropout", action="store_true",
                   help="turn the base model's dropout off for the in-process measurements (the ceiling)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the workload's device (tiny: cpu; minilm, bert-base: cuda)")
    add_common(p)
    p.set_defaults(func=cmd_bench)
