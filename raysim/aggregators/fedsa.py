"""FedSA-LoRA: share and average A, keep B on each client (arXiv 2410.01463)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import (AB, AggregateResult, Aggregator, ClientPlan, ClientUpdate, average_parts,
                                     client_start, register)
from raysim.lora.factors import Factors, LoRAFactors, grams, sandwich_norms

ONLY_A = frozenset({"a"})


@register("fedsa")
class FedSA(Aggregator):
    """FedSA-LoRA: A shared and averaged, B personal (never uploaded); personalised, no global update.

    Client k's model is W0 + s·B_k·Ā. The server keeps Ā and, standing in for the client's own storage,
    each client's trained B_k (`client_b[client_id][module]`, zeros of the client's rank until its
    first participation); the server never modifies a B_k. `evaluation_factors()` returns the
    simulation-only diagnostic (Ā, B̄) with B̄ = Σ p_k B̃_k / s over the participants of the last
    round (B̄ never leaves the clients in a real deployment). Stats: broadcast drift
    δ_k = ‖s·B_k·(Ā − A_k)‖_F / ‖s·B_k·A_k‖_F over all modules, p-weighted mean and max.
    """

    personalized = True
    uploads = "A_k (r×n)"
    broadcasts = "Ā"
    comm_per_module = "up rn, down rn"
    client_state = ("client_b",)
    client_b: dict[int, dict[str, np.ndarray]]      # client id -> module -> B_k (m, r_k), as trained

    def own_b(self, client_id: int) -> dict[str, np.ndarray]:
        """Client's stored B (unscaled, its own rank); zeros before its first participation."""
        own = self.client_b.get(client_id)
        if own is not None:
            return own
        rank = self.client_ranks[client_id]
        return {name: np.zeros((g.b.shape[0], rank), dtype=g.b.dtype) for name, g in self.global_factors.items()}

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        rank = self.client_ranks[client_id]
        scale = self.scale_of_rank(rank)
        shared = client_start(self.global_factors, rank, scale)
        own = self.own_b(client_id)
        start = {name: LoRAFactors(a=f.a, b=own[name].copy(), scale=scale) for name, f in shared.items()}
        return ClientPlan(start=start, upload=ONLY_A, download=ONLY_A)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        new = average_parts(self.global_factors, updates, AB)     # Ā, and the diagnostic B̄
        drift = broadcast_drifts(updates, new)
        for u in updates:   # the clients' own B, stored as trained (the server never changes them)
            self.client_b[u.client_id] = {name: f.b.copy() for name, f in u.factors.items()}
        self.global_factors = new
        return AggregateResult(stats=drift_stats(drift, {u.client_id: u.weight for u in updates}))


def broadcast_drifts(updates: list[ClientUpdate], shared: Factors) -> dict[int, float]:
    """δ_k = ‖B̃_k (Ā − A_k)‖_F / ‖B̃_k A_k‖_F per client, all modules together (NaN if the client's ΔW is 0);
    per module through the r×r Gram forms (`sandwich_norms`), no m×n product."""
    num2 = np.zeros(len(updates))
    den2 = np.zeros(len(updates))
    for name, g in shared.items():
        fs = [u.factors[name] for u in updates]
        gb = grams([f.b_tilde() for f in fs], "left")                                 # B̃_kᵀB̃_k (K, r, r)
        a = [f.a for f in fs]
        num2 += sandwich_norms(gb, grams(a, "right", minus_from=g.a)) ** 2           # (Ā − A_k)(Ā − A_k)ᵀ
        den2 += sandwich_norms(gb, grams(a, "right")) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = np.where(den2 > 1e-24, np.sqrt(num2 / den2), np.nan)
    return {u.client_id: float(d) for u, d in zip(updates, drift)}


def drift_stats(drift: dict[int, float], weight: dict[int, float]) -> dict[str, float]:
    """p-weighted mean and max of per-client drifts δ_k over clients of weight > 0 with a finite δ_k (FedSA-LoRA,
    CE-LoRA): `broadcast_drift_mean`, `broadcast_drift_max` (NaN when there is none)."""
    ok = [c for c, d in drift.items() if np.isfinite(d) and weight[c] > 0]
    total = sum(weight[c] for c in ok)
    if not ok or total <= 0:
        return {"broadcast_drift_mean": float("nan"), "broadcast_drift_max": float("nan")}
    return {"broadcast_drift_mean": float(sum(weight[c] * drift[c] for c in ok) / total),
            "broadcast_drift_max": float(max(drift[c] for c in ok))}
