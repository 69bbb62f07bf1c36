"""One full bench of a workload: the in-process probes, then the end-to-end runs, then the targets."""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from typing import Any

from raysim.bench.workloads import WORKLOADS
from raysim.models import target_modules


def run_bench(workload: str, *, ks: list[int] | None = None, e2e_engines: list[str] | None = None,
              rounds: int | None = None, engine_clients: int | None = None, min_time_s: float | None = None,
              device: str = "auto", address: str | None = None, verbose: bool = False,
              no_dropout: bool = False, trials: int = 1, log=print) -> dict[str, Any]:
    import torch

    from raysim.bench.machine import machine_info

    spec = WORKLOADS[workload]
    dev, cfg = _device_and_config(workload, spec, device)
    n_clients = engine_clients or spec["engine_clients"]
    min_time = spec["min_time_s"] if min_time_s is None else min_time_s
    out: dict[str, Any] = {
        "workload": workload,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "device": str(dev),
        "settings": _settings(cfg, dev, n_clients, torch.get_num_threads(), no_dropout),
    }
    out.update(_in_process(workload, cfg, dev, ks or spec["ks"], n_clients, min_time, no_dropout, log))
    e2e_engines = ["peft", "cohort"] if e2e_engines is None else e2e_engines
    if no_dropout and e2e_engines:
        log("[bench] --no-dropout changes the in-process model only; the end-to-end runs keep dropout")
    _end_to_end(out, cfg, dev, e2e_engines, rounds or spec["e2e_rounds"], trials, address, verbose, log)
    out["targets"] = targets(out)
    return out


def _device_and_config(workload: str, spec: dict[str, Any], device: str):
    import torch

    from raysim.config import validate_config

    want = spec["device"] if device == "auto" else device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"workload {workload!r} needs a CUDA GPU (use --device cpu to run it on the CPU anyway)")
    dev = torch.device(want)
    raw_cfg = copy.deepcopy(spec["config"])
    if dev.type == "cpu":
        raw_cfg["model"]["dtype"] = "float32"
        raw_cfg["resources"]["gpus_per_worker"] = 0
    return dev, validate_config(raw_cfg)


def _settings(cfg, dev, n_clients: int, threads: int, no_dropout: bool) -> dict[str, Any]:
    return {"model": cfg.model.name, "dtype": cfg.model.dtype if dev.type == "cuda" else "float32",
            "batch_size": cfg.train.batch_size, "max_length": cfg.model.max_length,
            "local_steps": cfg.train.local_steps, "rank": cfg.lora.rank,
            "task": cfg.task.type, "target_modules": target_modules(cfg), "engine_clients": n_clients,
            "threads": 1 if dev.type == "cpu" else threads,
            "base_dropout": "off (in-process measurements)" if no_dropout else "as configured (0.1)"}


def _in_process(workload: str, cfg, dev, ks: list[int], n_clients: int, min_time: float, no_dropout: bool,
                log) -> dict[str, Any]:
    """Floor, PEFT and cohort-per-K throughput in this process (one thread on CPU)."""
    import torch

    from raysim.bench.inprocess import Bench, calibrate_cohort, measure_cohort, measure_floor, measure_peft

    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
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
        calibration = calibrate_cohort(b)
        log(f"[bench] cohort_size: auto chooses K={calibration.cohort_size}")
        del b
    finally:
        torch.set_num_threads(threads)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    best_k = max(by_k, key=by_k.get)
    return {"floor_client_steps_per_s": floor, "engines": {
        "peft": {"client_steps_per_s": peft},
        "cohort": {"client_steps_per_s": by_k[best_k], "best_k": best_k,
                   "by_k": {str(k): v for k, v in by_k.items()}, "calibration": calibration.as_dict(),
                   "speedup_vs_peft": {str(k): v / peft for k, v in by_k.items()}},
    }}


def _end_to_end(out: dict[str, Any], cfg, dev, engines: list[str], rounds: int, trials: int,
                address: str | None, verbose: bool, log) -> None:
    """`trials` end-to-end runs per engine, interleaved (peft, cohort, cohort, peft, ...), into out["e2e"]
    as medians (the raw runs under "trials"); overhead ratios against the in-process rates; the start-up
    phases' medians over all runs that report them."""
    from raysim.bench.e2e import median_phases, median_run, run_e2e

    parallel = cfg.resources.num_workers if dev.type == "cpu" else 1
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for trial in range(trials):
        for engine in (engines if trial % 2 == 0 else engines[::-1]):
            # the PEFT engine is slow on a GPU (that is the point): fewer rounds suffice for its steady state
            n_rounds = rounds if engine == "cohort" or dev.type == "cpu" else min(rounds, 4)
            log(f"[bench] end to end {trial + 1}/{trials}, engine {engine}: {n_rounds} rounds × "
                f"{cfg.federation.clients_per_round} clients × {cfg.train.local_steps} steps, "
                f"{cfg.resources.num_workers} workers")
            runs[engine].append(run_e2e(cfg, engine, n_rounds, address, verbose))
            log(_e2e_line(runs[engine][-1]))
    out["e2e"] = {}
    for engine, results in runs.items():
        res = median_run(results)
        res["overhead_ratio"] = res["round_time_s"] / (res["client_steps_per_round"] / (out["floor_client_steps_per_s"]
                                                                                        * parallel))
        in_proc = _in_process_rate(out["engines"], engine, cfg.resources.cohort_size)
        res["overhead_vs_engine"] = res["round_time_s"] / (res["client_steps_per_round"] / (in_proc * parallel))
        out["e2e"][engine] = res
        out["engines"][engine]["e2e_client_steps_per_s"] = res["client_steps_per_s"]
    if out["e2e"]:
        main = out["e2e"].get("cohort") or next(iter(out["e2e"].values()))
        out["overhead_ratio"] = main["overhead_ratio"]
        out["e2e_engine"] = main["engine"]
    else:
        out["overhead_ratio"] = None
    phases = median_phases([r.get("startup_phases") for rs in runs.values() for r in rs])
    if phases is not None:
        out["startup_phases"] = phases


def _in_process_rate(engines: dict[str, Any], engine: str, cohort_size: int | str) -> float:
    """The in-process rate of the end-to-end engine: PEFT, or the cohort engine at the configured
    cohort size (`auto`: the calibrated one; capped at the largest K measured; the best K when that one was
    not measured)."""
    if engine == "peft":
        return engines["peft"]["client_steps_per_s"]
    by_k = {int(k): v for k, v in engines["cohort"]["by_k"].items()}
    if cohort_size == "auto":
        cohort_size = engines["cohort"]["calibration"]["cohort_size"]
    return by_k.get(min(cohort_size, max(by_k)), engines["cohort"]["client_steps_per_s"])


def _e2e_line(res: dict[str, Any]) -> str:
    line = (f"[bench]   steady round {res['round_time_s']:.3f} s  = {res['client_steps_per_s']:.1f} client-steps/s; "
            f"start-up {res['startup_s']:.1f} s, teardown {res['teardown_s']:.1f} s")
    phases = res.get("startup_phases")
    if phases:
        line += "\n[bench]   start-up phases: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
    return line


def _startup_targets(phases: dict[str, float] | None) -> dict[str, Any]:
    """Start-up + teardown within 6 s, and at most 0.5 s of start-up beyond Ray's start and the workers'."""
    if not phases or "startup_s" not in phases:
        return {}
    slack = phases["startup_s"] - phases["ray_init_s"] - phases["workers_ready_s"]
    return {"startup_plus_teardown_le_6s": phases["startup_s"] + phases["teardown_s"] <= 6.0,
            "startup_slack_le_0.5s": slack <= 0.5}


def targets(out: dict[str, Any]) -> dict[str, Any]:
    """The bench's targets, evaluated on this result (None where not measured)."""
    t: dict[str, Any] = {}
    peft = out["engines"]["peft"]["client_steps_per_s"]
    by_k = {int(k): v for k, v in out["engines"]["cohort"]["by_k"].items()}
    e2e = out.get("e2e", {})
    if out["device"] == "cpu":
        t["cohort_ge_1.0x_peft_every_k"] = all(v >= peft for v in by_k.values())
        big = [v for k, v in by_k.items() if k >= 8]
        t["cohort_ge_1.1x_peft_k_ge_8"] = all(v >= 1.1 * peft for v in big) if big else None
        calibrated = out["engines"]["cohort"].get("calibration", {}).get("cohort_size")
        t["cohort_ge_1.1x_peft_at_calibrated_k"] = by_k[calibrated] >= 1.1 * peft if calibrated in by_k else None
        if "cohort" in e2e:
            t["round_time_le_1.0x_floor_per_worker"] = e2e["cohort"]["overhead_ratio"] <= 1.0
            t.update(_startup_targets(e2e["cohort"].get("startup_phases")))
    else:
        factor = 5 if out["workload"] == "llama-1b" else 10
        t[f"cohort_ge_{factor}x_peft"] = max(by_k.values()) >= factor * peft
        if "cohort" in e2e and out["workload"] == "minilm":
            t["e2e_ge_1200_client_steps_per_s"] = e2e["cohort"]["client_steps_per_s"] >= 1200
    return t
