"""FFA-LoRA: A frozen at the shared initialisation, only B trained and averaged (arXiv 2403.12313)."""

from __future__ import annotations

from raysim.aggregators.base import (SHARED_SEED, AggregateResult, Aggregator, ClientPlan, ClientUpdate,
                                     average_parts, client_start, register)

ONLY_B = frozenset({"b"})


@register("ffa")
class FFA(Aggregator):
    """FFA-LoRA: A frozen at the shared seed's init, only B trained and averaged; exact (D = 0).

    Every client holds the same A (the `init` given to `setup`, identical bit for bit), so
    Σ_k p_k s B_k A = s·B̄·A. The server averages B̃_k = s·B_k; A is never touched. A comes from the
    shared seed, charged once per client (one scalar, `once`); B_g (m×r) is charged on every download.
    Equal ranks only.
    """

    exact = True
    uploads = "B_k (m×r)"
    broadcasts = "B_g (A fixed by the shared seed, sent once)"
    comm_per_module = "up rm, down rm (+ the seed once)"

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        rank = self.client_ranks[client_id]
        start = client_start(self.global_factors, rank, self.scale_of_rank(rank))  # A bitwise = init A
        return ClientPlan(start=start, train=ONLY_B, upload=ONLY_B, download=ONLY_B, once=SHARED_SEED)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        self.global_factors = average_parts(self.global_factors, updates, ONLY_B)   # the same A arrays
        return AggregateResult()
