"""Server-side cost of each aggregator: aggregate() plus the deviation metric, on a BERT-base-shaped
adapter (24 modules of 768×768, query/value in 12 layers) with many clients. Pure numpy, no Ray.

Used by `raysim bench --workload aggregators` to show that aggregation never dominates a round.
"""

from __future__ import annotations

import time

import numpy as np

from raysim.aggregators import REGISTRY, build_aggregator
from raysim.aggregators.base import ClientUpdate
from raysim.lora.factors import LoRAFactors, deviation


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


def time_aggregators(num_clients: int = 100, rank: int = 16, alpha: float = 32, layers: int = 12,
                     names: list[str] | None = None, seed: int = 0) -> list[dict]:
    """Seconds per round of aggregate() and of the deviation metric, per method (second round timed)."""
    rng = np.random.default_rng(seed)
    shapes = bert_base_shapes(layers)
    init = {k: LoRAFactors(a=(rng.uniform(-1, 1, size=(rank, n)) / np.sqrt(n)).astype(np.float32),
                           b=np.zeros((m, rank), np.float32), scale=alpha / rank) for k, (m, n) in shapes.items()}
    rows = []
    for name in names or sorted(REGISTRY):
        agg = build_aggregator(name, {})
        agg.setup(init, {c: rank for c in range(num_clients)}, lambda r: alpha / r, seed)
        clients = list(range(num_clients))
        agg.aggregate(1, _updates(agg, 1, clients, rng))          # round 1 warms up state (FlexLoRA's SVD, …)
        updates = _updates(agg, 2, clients, rng)
        old = {k: f.copy() for k, f in agg.global_factors.items()}
        t0 = time.perf_counter()
        result = agg.aggregate(2, updates)
        t_agg = time.perf_counter() - t0
        t_dev = 0.0
        if not agg.personalized and result.deviation_rel is None:
            t0 = time.perf_counter()
            per_module = {n: [(u.weight, u.factors[n]) for u in updates] for n in shapes}
            deviation(per_module, agg.global_factors, result.base_delta, old)
            t_dev = time.perf_counter() - t0
        rows.append({"aggregator": name, "clients": num_clients, "rank": rank, "modules": len(shapes),
                     "aggregate_s": t_agg, "deviation_s": t_dev, "server_s": t_agg + t_dev})
    return rows


def format_aggregator_table(rows: list[dict]) -> str:
    lines = ["| aggregator | clients | modules | aggregate s | deviation s | server s per round |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['aggregator']} | {r['clients']} | {r['modules']} | {r['aggregate_s']:.3f} | "
                     f"{r['deviation_s']:.3f} | {r['server_s']:.3f} |")
    return "\n".join(lines)
