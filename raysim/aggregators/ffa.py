"""FFA-LoRA: A frozen at the shared initialisation, only B trained and averaged (arXiv 2403.12313)."""

from __future__ import annotations

from raysim.aggregators.base import (AggregateResult, Aggregator, ClientPlan, ClientUpdate, client_start,
                                     register, weighted_mean)
from raysim.lora.factors import LoRAFactors


@register("ffa")
class FFA(Aggregator):
    """FFA-LoRA: A frozen at the shared seed's init, only B trained and averaged; exact (D = 0).

    Every client holds the same A (the `init` given to `setup`, identical bit for bit), so
    Σ_k p_k s B_k A = s·B̄·A. The server averages B̃_k = s·B_k; A is never touched. A comes from the
    shared seed and is never charged; B_g (m×r) is charged on every download. Equal ranks only.
    """

    exact = True
    uploads = "B_k (m×r)"
    broadcasts = "B_g (A fixed by the shared seed)"
    comm_per_module = "up rm, down rm"

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        rank = self.client_ranks[client_id]
        start = client_start(self.global_factors, rank, self.scale_of_rank(rank))  # A bitwise = init A
        only_b = frozenset({"b"})
        return ClientPlan(start=start, train=only_b, upload=only_b, download=only_b)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        weights = [u.weight for u in updates]
        new = {}
        for name, g in self.global_factors.items():
            bt = weighted_mean([u.factors[name].b_tilde() for u in updates], weights)   # B̃̄ (m, r)
            new[name] = LoRAFactors(a=g.a, b=(bt / g.scale).astype(g.b.dtype), scale=g.scale)  # same A object
        self.global_factors = new
        return AggregateResult()
