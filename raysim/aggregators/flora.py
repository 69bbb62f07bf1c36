"""FLoRA: stack the client adapters, merge them into the base, re-initialise (arXiv 2409.05976)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import (SHARED_SEED, AggregateResult, Aggregator, ClientPlan, ClientUpdate,
                                     derived_rng, kaiming_a, register)
from raysim.lora.factors import BaseDelta, Factors, LoRAFactors, ideal_update


def fresh_adapter(template: Factors, rank: int, scale: float, seed: int, *keys: int | str) -> Factors:
    """PEFT-style fresh LoRA of `rank` per module: A Kaiming-uniform (seeded from (seed, *keys, module)),
    B = 0, in the dtype of `template` (module -> LoRAFactors giving m, n)."""
    out = {}
    for name, g in template.items():
        m, n = g.shape
        a = kaiming_a(rank, n, derived_rng(seed, *keys, name))                          # (rank, n)
        out[name] = LoRAFactors(a=a.astype(g.a.dtype), b=np.zeros((m, rank), dtype=g.b.dtype), scale=scale)
    return out


@register("flora")
class FLoRA(Aggregator):
    """FLoRA: stack p_k·B̃_k and A_k, merge U·V into the base (scale 1), fresh adapters each round; exact.

    base_delta = U·V with U = [p_1 B̃_1 | … | p_K B̃_K] (m×q), V = [A_1; …; A_K] (q×n), q = Σ r_k, so the
    new base is W_base + ΔW*; p_k and s_k are folded into U (not the official code's α·K trick). The
    new global adapter is B = 0 with a fresh A (seed from (seed, round)); every client starts each round
    from its own fresh adapter, A Kaiming-uniform seeded from (seed, round, client), B = 0. Those are
    derived from the shared seed, charged once per client (one scalar, `once`), not as factors; the
    base catch-up (U, V) is charged by the ledger from base_delta. Heterogeneous ranks: client k uses
    rank r_k and scale s(r_k).
    """

    exact = True
    changes_base = True
    mixed_ranks = True
    uploads = "A_k (r_k×n), B_k (m×r_k)"
    broadcasts = "stacked U·V (factored q(m+n) or dense mn); fresh adapters come from seeds"
    comm_per_module = "up r_k(m+n), down min(mn, q(m+n)) (+ the seed once)"

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        rank = self.client_ranks[client_id]
        start = fresh_adapter(self.global_factors, rank, self.scale_of_rank(rank), self.seed, rnd, client_id)
        return ClientPlan(start=start, download=frozenset(), once=SHARED_SEED)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # the stack's order does not matter
        base_delta = {}
        for name in self.global_factors:
            u, v = ideal_update([(up.weight, up.factors[name]) for up in updates])    # (m, q), (q, n) float64
            base_delta[name] = BaseDelta(u=u, v=v)
        self.global_factors = {name: fresh_adapter({name: g}, g.rank, g.scale, self.seed, rnd, "global")[name]
                               for name, g in self.global_factors.items()}
        q = next(iter(base_delta.values())).u.shape[1]
        return AggregateResult(base_delta=base_delta, stats={"stack_rank": float(q)})
