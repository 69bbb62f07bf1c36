"""FedIT: plain FedAvg of the LoRA factors (Towards Building the Federated GPT, arXiv 2305.05644)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import AggregateResult, Aggregator, ClientUpdate, register
from raysim.aggregators.padding import zero_padded_mean
from raysim.lora.factors import BaseDelta, Factors, LoRAFactors


@register("fedit")
class FedIT(Aggregator):
    """Plain FedAvg of A and B; inexact: error s·Σ p_k (B_k − B̄)(A_k − Ā) when clients differ.

    Clients continue from the averaged pair (A_g, B_g), stored as float32. Mixed ranks: zero-padded
    slot-wise average (HetLoRA with p_k, see docs/algorithms.md, HetLoRA), each client gets the first
    r_k slots; slots no participant owns keep their value. Equal ranks give bitwise the plain average.
    """

    exact = False
    mixed_ranks = True
    uploads = "A_k (r×n), B_k (m×r)"
    broadcasts = "A_g, B_g"
    comm_per_module = "up r(m+n), down r(m+n)"

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        scale = next(iter(self.global_factors.values())).scale
        mean = zero_padded_mean(updates, self.global_factors, scale)     # float64, at the global rank
        base_delta = self.base_change(updates, mean)
        self.global_factors = {k: _to32(f) for k, f in mean.items()}
        return AggregateResult(base_delta=base_delta)

    def base_change(self, updates: list[ClientUpdate], mean: Factors) -> dict[str, BaseDelta] | None:
        """What is folded into the frozen base besides the new adapter `mean`: nothing for FedIT."""
        return None


def _to32(f: LoRAFactors) -> LoRAFactors:
    return LoRAFactors(a=f.a.astype(np.float32), b=f.b.astype(np.float32), scale=f.scale)
