"""RoLoRA / LoRA-A²: alternate which factor trains, B first (arXiv 2409.02346, 2502.01755, 2410.22815)."""

from __future__ import annotations

from raysim.aggregators.base import (AB, AggregateResult, Aggregator, ClientPlan, ClientUpdate, average_parts,
                                     client_start, register)


def phase(rnd: int) -> str:
    """The factor trained in round `rnd` (1-based): 'b' in odd rounds, 'a' in even rounds."""
    return "b" if rnd % 2 == 1 else "a"


@register("rolora")
class RoLoRA(Aggregator):
    """Alternating LoRA: odd rounds train and average B (A frozen), even rounds A (B frozen); exact.

    The frozen factor is the broadcast one, identical on every client, so averaging the trained one
    is exact: Σ p_k s B_k A = s·B̄·A (B-phase), Σ p_k s B A_k = s·B·Ā (A-phase). Round 1 is a B-phase
    (B = 0 at init makes ∂L/∂A = 0). Download: only the factor averaged in the previous round, or both
    when the client's update was not aggregated in the previous round (server state `last_round`,
    updated in `aggregate`, so a client that was sampled but failed pays for both). Equal ranks only.
    """

    exact = True
    uploads = "B_k (m×r) in odd rounds, A_k (r×n) in even rounds"
    broadcasts = "the factor averaged in the previous round (both after a missed round)"
    comm_per_module = "up rm or rn (alternating), down rn or rm (r(m+n) after a missed round)"
    client_state = ("last_round",)
    last_round: dict[int, int]          # client id -> last round whose update was aggregated

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        rank = self.client_ranks[client_id]
        trained = frozenset({phase(rnd)})
        up_to_date = self.last_round.get(client_id) == rnd - 1
        download = frozenset({phase(rnd - 1)}) if up_to_date else AB
        start = client_start(self.global_factors, rank, self.scale_of_rank(rank))
        return ClientPlan(start=start, train=trained, upload=trained, download=download)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        trained = phase(rnd)
        self.global_factors = average_parts(self.global_factors, updates, frozenset({trained}))
        for u in updates:
            self.last_round[u.client_id] = rnd
        return AggregateResult(stats={"phase_b": float(trained == "b")})
