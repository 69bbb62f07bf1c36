"""Small random federated problems for aggregator tests (float64, unequal weights).

A "round" is simulated without a model: each sampled client gets its plan, "trains" by replacing
the factors in `plan.train` with its start plus random noise (frozen factors stay bitwise equal to
the start, as the coordinator fills them), and the aggregator folds the results.
"""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import (Aggregator, ClientData, ClientPlan, ClientUpdate, build_aggregator,
                                     weighted_mean)
from raysim.lora.factors import BaseDelta, Factors, LoRAFactors

SHAPES = {"layer.q": (7, 5), "layer.v": (6, 6)}      # (m, n): non-square and square
ALPHA = 4.0
RANK = 2
NUM_LABELS = 4


def scale_of_rank(rank: int) -> float:
    return ALPHA / rank


def make_init(shapes: dict[str, tuple[int, int]], rank: int, rng: np.random.Generator,
              dtype=np.float64, b_zero: bool = True) -> Factors:
    """PEFT-like init of `rank`: A uniform(±1/√n), B = 0 (or random with b_zero=False)."""
    out = {}
    for name, (m, n) in shapes.items():
        a = rng.uniform(-1, 1, size=(rank, n)) / np.sqrt(n)
        b = np.zeros((m, rank)) if b_zero else rng.normal(size=(m, rank))
        out[name] = LoRAFactors(a=a.astype(dtype), b=b.astype(dtype), scale=scale_of_rank(rank))
    return out


def make_aggregator(name: str, params: dict | None = None, ranks=(RANK, RANK, RANK), shapes=SHAPES,
                    seed: int = 0, init_seed: int = 1, b_zero: bool = True) -> tuple[Aggregator, Factors]:
    """Aggregator set up with clients 0..K−1 of the given ranks and an init at the maximum rank."""
    init = make_init(shapes, max(ranks), np.random.default_rng(init_seed), b_zero=b_zero)
    agg = build_aggregator(name, dict(params or {}))
    agg.setup(init, {cid: r for cid, r in enumerate(ranks)}, scale_of_rank, seed)
    return agg, init


def random_weights(k: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(0.5, 2.0, size=k)
    return w / w.sum()


def train(plan: ClientPlan, rng: np.random.Generator, noise: float = 0.5) -> Factors:
    """End-of-round factors: trained factors = start + N(0, noise²), frozen ones = the start (copied)."""
    out = {}
    for name, f in plan.start.items():
        new = f.copy()
        for part in plan.train:
            x = getattr(new, part)
            setattr(new, part, (x + noise * rng.normal(size=x.shape)).astype(x.dtype))
        out[name] = new
    return out


def client_data(client_id: int) -> ClientData:
    """A client's training labels for client hooks: 20 labels drawn from a generator seeded by its id."""
    labels = np.random.default_rng(1000 + client_id).integers(0, NUM_LABELS, size=20)
    return ClientData(labels=labels.astype(np.int64), num_labels=NUM_LABELS)


def make_updates(agg: Aggregator, rnd: int, client_ids, weights, rng: np.random.Generator,
                 identical: bool = False) -> list[ClientUpdate]:
    """Plan and "train" every client, running the plan's client hook if it has one; identical=True gives
    every client the first client's factors."""
    updates = []
    first = None
    for cid, w in zip(client_ids, weights):
        plan = agg.plan(rnd, cid)
        factors = train(plan, rng)
        if identical:
            first = first or factors
            factors = {name: f.copy() for name, f in first.items()}
        hook_output = plan.client_hook(client_data(cid)) if plan.client_hook is not None else None
        updates.append(ClientUpdate(client_id=cid, weight=float(w), num_samples=10, factors=factors,
                                    hook_output=hook_output))
    return updates


def average_factors(updates: list[ClientUpdate], scale: float) -> Factors:
    """Oracle: Ā = Σ p_k A_k and B̄ = (Σ p_k B̃_k) / scale for every module (equal ranks), float64."""
    weights = [u.weight for u in updates]
    out = {}
    for name in updates[0].factors:
        a = weighted_mean([u.factors[name].a for u in updates], weights)              # (r, n)
        bt = weighted_mean([u.factors[name].b_tilde() for u in updates], weights)     # (m, r)
        out[name] = LoRAFactors(a=a, b=bt / scale, scale=scale)
    return out


def ideal_dense(updates: list[ClientUpdate], name: str) -> np.ndarray:
    """ΔW* = Σ p_k s_k B_k A_k, dense float64 (m, n)."""
    return sum(u.weight * u.factors[name].scale * (u.factors[name].b.astype(np.float64)
                                                   @ u.factors[name].a.astype(np.float64)) for u in updates)


def product(f: LoRAFactors) -> np.ndarray:
    """ΔW = s·B·A (s·B·C·A for tri-matrix factors), float64."""
    b = f.b.astype(np.float64) if f.c is None else f.b.astype(np.float64) @ f.c.astype(np.float64)
    return f.scale * (b @ f.a.astype(np.float64))


def base_dense(base_delta: dict[str, BaseDelta] | None, name: str, shape: tuple[int, int]) -> np.ndarray:
    if base_delta is None or name not in base_delta:
        return np.zeros(shape)
    return base_delta[name].dense()


def applied_dense(agg: Aggregator, base_delta: dict[str, BaseDelta] | None, name: str) -> np.ndarray:
    """The evaluated global model minus the base before the round, dense float64: this round's base change
    + the global model's own base change (`evaluation_base_delta`) + the evaluated adapter's product."""
    f = agg.evaluation_factors()[name]
    shape = f.shape
    return base_dense(base_delta, name, shape) + base_dense(agg.evaluation_base_delta(), name, shape) + product(f)


def dense_deviation_rel(updates: list[ClientUpdate], agg: Aggregator, base_delta) -> float:
    """Oracle of deviation_rel: sqrt(Σ_l ‖ΔW*_l − applied_l‖²) / sqrt(Σ_l ‖ΔW*_l‖²), dense float64."""
    num2 = den2 = 0.0
    for name in updates[0].factors:
        star = ideal_dense(updates, name)
        num2 += np.linalg.norm(star - applied_dense(agg, base_delta, name)) ** 2
        den2 += np.linalg.norm(star) ** 2
    return float(np.sqrt(num2 / den2))


def tolerance(factors: Factors) -> float:
    """1e-10 for float64 globals; 1e-6 for aggregators that store float32 (fedit, fedex)."""
    dtype = next(iter(factors.values())).a.dtype
    return 1e-10 if dtype == np.float64 else 1e-6
