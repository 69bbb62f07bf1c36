"""RoLoRA / LoRA-A²: alternate which factor trains, B first (arXiv 2409.02346, 2502.01755, 2410.22815)."""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.aggregators.base import (AB, AggregateResult, Aggregator, ClientPlan, ClientUpdate, client_start,
                                     register, weighted_mean)
from raysim.lora.factors import LoRAFactors


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

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.last_round: dict[int, int] = {}     # client id -> last round whose update was aggregated

    def setup(self, init, client_ranks, scale_of_rank, seed) -> None:
        super().setup(init, client_ranks, scale_of_rank, seed)
        self.last_round = {}

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        rank = self.client_ranks[client_id]
        trained = frozenset({phase(rnd)})
        up_to_date = self.last_round.get(client_id) == rnd - 1
        download = frozenset({phase(rnd - 1)}) if up_to_date else AB
        start = client_start(self.global_factors, rank, self.scale_of_rank(rank))
        return ClientPlan(start=start, train=trained, upload=trained, download=download)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        weights = [u.weight for u in updates]
        trained = phase(rnd)
        new = {}
        for name, g in self.global_factors.items():
            if trained == "b":
                bt = weighted_mean([u.factors[name].b_tilde() for u in updates], weights)    # (m, r)
                new[name] = LoRAFactors(a=g.a, b=(bt / g.scale).astype(g.b.dtype), scale=g.scale)
            else:
                a = weighted_mean([u.factors[name].a for u in updates], weights)              # (r, n)
                new[name] = LoRAFactors(a=a.astype(g.a.dtype), b=g.b, scale=g.scale)
        self.global_factors = new
        for u in updates:
            self.last_round[u.client_id] = rnd
        return AggregateResult(stats={"phase_b": float(trained == "b")})

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, meta = super().state_dict()
        meta["last_round"] = {str(k): int(v) for k, v in self.last_round.items()}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.last_round = {int(k): int(v) for k, v in meta.get("last_round", {}).items()}
