"""FedIT: plain FedAvg of the LoRA factors (Towards Building the Federated GPT, arXiv 2305.05644)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import AggregateResult, Aggregator, ClientUpdate, register, weighted_mean
from raysim.aggregators.padding import zero_padded_mean
from raysim.lora.factors import Factors, LoRAFactors


def average_factors(updates: list[ClientUpdate], scale: float) -> Factors:
    """Ā = Σ p_k A_k and B̄ = (Σ p_k B̃_k) / scale for every module (equal ranks), float64.

    updates[k].factors[module] = LoRAFactors(a (r, n), b (m, r), s_k); returns factors of scale `scale`.
    """
    weights = [u.weight for u in updates]
    out = {}
    for name in updates[0].factors:
        a = weighted_mean([u.factors[name].a for u in updates], weights)              # (r, n)
        bt = weighted_mean([u.factors[name].b_tilde() for u in updates], weights)     # (m, r)
        out[name] = LoRAFactors(a=a, b=bt / scale, scale=scale)
    return out


@register("fedit")
class FedIT(Aggregator):
    """Plain FedAvg of A and B; inexact: error s·Σ p_k (B_k − B̄)(A_k − Ā) when clients differ.

    Clients continue from the averaged pair (A_g, B_g). Mixed ranks: zero-padded slot-wise average
    (HetLoRA with p_k, ALGORITHMS.md §2.7), each client gets the first r_k slots; slots no participant
    owns keep their value. Equal ranks give bitwise the plain average.
    """

    exact = False
    mixed_ranks = True
    uploads = "A_k (r×n), B_k (m×r)"
    broadcasts = "A_g, B_g"
    comm_per_module = "up r(m+n), down r(m+n)"

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        scale = next(iter(self.global_factors.values())).scale
        mean = zero_padded_mean(updates, self.global_factors, scale)     # == average_factors for equal ranks
        self.global_factors = {k: _to32(f) for k, f in mean.items()}
        return AggregateResult()


def _to32(f: LoRAFactors) -> LoRAFactors:
    return LoRAFactors(a=f.a.astype(np.float32), b=f.b.astype(np.float32), scale=f.scale)
