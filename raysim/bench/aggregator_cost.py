"""Server-side cost of each aggregator: aggregate() plus the deviation metric, on a BERT-base-shaped
adapter (24 modules of 768×768, query/value in 12 layers) with many clients. Pure numpy, no Ray.

Used by `raysim bench --workload aggregators`. Every time is set against `calibration_s`, measured in
the same run: forming ΔW* = U·V once per module with one BLAS product each (the stacked float64
factors of the same clients), the floor of anything that needs ΔW*. For each method and client count
the second round is timed (the first one sets up the server state: FlexLoRA's SVD, FedSA's B_k, …),
in ≥ 5 trials that interleave calibration, aggregate() and the deviation metric, and the client counts
of a method alternate; the medians are reported, with the 1-minute load average before and after each
method's block (`os.getloadavg()`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time

import numpy as np

from raysim.aggregators import REGISTRY, build_aggregator
from raysim.aggregators.base import ClientUpdate
from raysim.base_log import compacted
from raysim.lora.factors import LoRAFactors, deviation, ideal_update


def bert_base_shapes(layers: int = 12) -> dict[str, tuple[int, int]]:
    return {f"bert.encoder.layer.{i}.attention.self.{p}": (768, 768) for i in range(layers) for p in ("query", "value")}


def _updates(agg, rnd: int, clients: list[int], rng: np.random.Generator) -> list[ClientUpdate]:
    weights = rng.uniform(0.5, 1.5, size=len(clients))
    weights /= weights.sum()
    ups = []
    for cid, w in zip(clients, weights):
        plan = agg.plan(rnd, cid)
        factors = {}
        for name, f in plan.start.items():
            a = f.a + (0.01 * rng.standard_normal(f.a.shape, dtype=np.float32) if "a" in plan.train else 0)
            b = f.b + (0.01 * rng.standard_normal(f.b.shape, dtype=np.float32) if "b" in plan.train else 0)
            c = None if f.c is None else f.c + (0.01 * rng.standard_normal(f.c.shape, dtype=np.float32)
                                                 if "c" in plan.train else 0)
            factors[name] = LoRAFactors(a=np.asarray(a, np.float32), b=np.asarray(b, np.float32), scale=f.scale, c=c)
        ups.append(ClientUpdate(cid, float(w), 100, factors))
    return ups


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def calibrate(updates: list[ClientUpdate]) -> float:
    """Seconds to form ΔW* once per module with one BLAS product each (the stacks are built untimed)."""
    stacks = [ideal_update([(u.weight, u.factors[name]) for u in updates]) for name in updates[0].factors]
    t0 = time.perf_counter()
    for u, v in stacks:
        np.dot(u, v)
    return time.perf_counter() - t0


def _prepare(name: str, init, num_clients: int, rank: int, alpha: float, seed: int):
    """(server state after round 1, round-2 updates, the global adapter before round 2) of one method."""
    rng = np.random.default_rng(seed)
    agg = build_aggregator(name, {})
    agg.setup(init, {c: rank for c in range(num_clients)}, lambda r: alpha / r, seed)
    clients = list(range(num_clients))
    agg.aggregate(1, _updates(agg, 1, clients, rng))          # round 1 warms up state (FlexLoRA's SVD, …)
    return agg, _updates(agg, 2, clients, rng), {k: f.copy() for k, f in agg.global_factors.items()}


def _trial(agg, updates, old) -> tuple[float, float, float]:
    """(calibration, aggregate, deviation) seconds of one round 2 on a copy of the prepared state."""
    cal = calibrate(updates)
    trial = copy.deepcopy(agg)
    # as on the coordinator: aggregation includes storing the base change (dense where that is smaller), and
    # the deviation metric reuses the stored form
    t_agg, (result, stored) = _timed(lambda: _aggregate(trial, updates))
    t_dev = 0.0
    if not trial.personalized and result.deviation_rel is None:
        per_module = {n: [(u.weight, u.factors[n]) for u in updates] for n in old}
        t_dev = _timed(lambda: deviation(per_module, trial.global_factors, stored, old))[0]
    return cal, t_agg, t_dev


def _aggregate(agg, updates):
    result = agg.aggregate(2, updates)
    return result, compacted(result.base_delta) if result.base_delta else None


def _method_rows(name: str, init, clients: tuple[int, ...], rank: int, alpha: float, trials: int,
                 seed: int) -> list[dict]:
    """One row per client count; the counts' trials alternate, so that their times share the machine's load."""
    prepared = {k: _prepare(name, init, k, rank, alpha, seed) for k in clients}
    times: dict[int, list[tuple[float, float, float]]] = {k: [] for k in clients}
    load = os.getloadavg()[0]
    for _ in range(trials):
        for k in clients:
            times[k].append(_trial(*prepared[k]))
    rows = []
    for k in clients:
        cal, agg_s, dev_s = (list(x) for x in zip(*times[k]))
        rows.append({"aggregator": name, "clients": k, "rank": rank, "modules": len(init),
                     "aggregate_s": statistics.median(agg_s), "deviation_s": statistics.median(dev_s),
                     "calibration_s": statistics.median(cal), "aggregate_trials_s": agg_s,
                     "deviation_trials_s": dev_s, "calibration_trials_s": cal,
                     "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)]})
    return rows


def time_aggregators(clients: tuple[int, ...] = (100, 200), rank: int = 16, alpha: float = 32, layers: int = 12,
                     names: list[str] | None = None, trials: int = 5, seed: int = 0,
                     blas_threads: int | None = 1) -> dict:
    """{calibration_s: {clients: s}, rows: [...], ...}: medians over `trials` per method and client count.

    Each row also has its own calibration (`calibration_s`, the median of the calibrations measured
    between its trials) and the 1-minute load average before and after its block; `load_ok` says
    whether every one stayed within the machine's core count. `blas_threads` caps the BLAS pool for the
    whole measurement (1: numpy on one core, as a coordinator with one CPU; None: leave it as it is).
    """
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    shapes = bert_base_shapes(layers)
    init = {k: LoRAFactors(a=(rng.uniform(-1, 1, size=(rank, n)) / np.sqrt(n)).astype(np.float32),
                           b=np.zeros((m, rank), np.float32), scale=alpha / rank) for k, (m, n) in shapes.items()}
    rows: list[dict] = []
    with threadpool_limits(limits=blas_threads) if blas_threads else contextlib.nullcontext():
        for name in names or sorted(REGISTRY):
            rows += _method_rows(name, init, tuple(clients), rank, alpha, trials, seed)
    rows.sort(key=lambda r: (r["clients"], r["aggregator"]))
    for r in rows:
        r["server_s"] = r["aggregate_s"] + r["deviation_s"]
    calibration = {k: statistics.median([c for r in rows if r["clients"] == k for c in r["calibration_trials_s"]])
                   for k in clients}
    loads = [x for r in rows for x in r["load_average_1m"]]
    return {"calibration_s": calibration, "rows": rows, "trials": trials, "blas_threads": blas_threads,
            "load_ok": max(loads) <= (os.cpu_count() or 1)}


def ratios(out: dict) -> dict[str, dict]:
    """Per method: aggregate_s and deviation_s ÷ the row's calibration at each client count, and the growth of
    its server seconds from the smallest to the largest count."""
    by = {(r["aggregator"], r["clients"]): r for r in out["rows"]}
    res: dict[str, dict] = {}
    for (name, k), r in sorted(by.items()):
        cal = r.get("calibration_s", out["calibration_s"][k])          # measured between the row's own trials
        entry = res.setdefault(name, {})
        entry[f"aggregate_x_cal_{k}"] = r["aggregate_s"] / cal
        entry[f"deviation_x_cal_{k}"] = r["deviation_s"] / cal
    ks = sorted(out["calibration_s"])
    if len(ks) >= 2:
        lo, hi = ks[0], ks[-1]
        for name, entry in res.items():
            a, b = by[(name, lo)], by[(name, hi)]
            entry[f"growth_{hi}_over_{lo}"] = b["server_s"] / a["server_s"] if a["server_s"] > 0 else float("nan")
    return res


def targets(out: dict) -> dict[str, bool]:
    """The acceptance targets (docs: BENCHMARKS.md): deviation ≤ 1.3×, FlexLoRA ≤ 2×, FedSA-LoRA, CE-LoRA and
    LoRA-FAIR ≤ 0.5× calibration_s at the smallest client count; every method's server time at the largest
    count ≤ 2.2× its time at the smallest."""
    lo = min(out["calibration_s"])
    rat = ratios(out)
    res = {}
    for name, entry in rat.items():
        if entry[f"deviation_x_cal_{lo}"] > 0:
            res[f"{name}_deviation_le_1.3x"] = entry[f"deviation_x_cal_{lo}"] <= 1.3
        limit = {"flexlora": 2.0, "fedsa": 0.5, "celora": 0.5, "lora_fair": 0.5}.get(name)
        if limit is not None:
            res[f"{name}_aggregate_le_{limit}x"] = entry[f"aggregate_x_cal_{lo}"] <= limit
        growth = next((v for k, v in entry.items() if k.startswith("growth_")), None)
        if growth is not None:
            res[f"{name}_growth_le_2.2x"] = growth <= 2.2
    return res


def format_aggregator_table(out: dict) -> str:
    lines = ["| aggregator | clients | modules | aggregate s | deviation s | server s per round | aggregate ÷ cal | "
             "deviation ÷ cal |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["rows"]:
        cal = r["calibration_s"]
        lines.append(f"| {r['aggregator']} | {r['clients']} | {r['modules']} | {r['aggregate_s']:.3f} | "
                     f"{r['deviation_s']:.3f} | {r['server_s']:.3f} | {r['aggregate_s'] / cal:.2f} | "
                     f"{r['deviation_s'] / cal:.2f} |")
    cals = ", ".join(f"{k} clients {v:.3f} s" for k, v in out["calibration_s"].items())
    lines.append(f"\ncalibration_s (ΔW* once per module, one BLAS product each): {cals}; ratios use each "
                 f"row's own calibration; load within the core count: {out['load_ok']}")
    return "\n".join(lines)
