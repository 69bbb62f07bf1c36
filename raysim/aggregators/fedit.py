"""FedIT: plain FedAvg of the LoRA factors (Towards Building the Federated GPT, arXiv 2305.05644)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import AggregateResult, Aggregator, ClientUpdate, register, weighted_mean
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

    Clients continue from the averaged pair (A_g, B_g). Equal ranks only.
    """

    exact = False
    uploads = "A_k (r×n), B_k (m×r)"
    broadcasts = "A_g, B_g"
    comm_per_module = "up r(m+n), down r(m+n)"

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        scale = next(iter(self.global_factors.values())).scale
        self.global_factors = {k: _to32(f) for k, f in average_factors(updates, scale).items()}
        return AggregateResult()


def _to32(f: LoRAFactors) -> LoRAFactors:
    return LoRAFactors(a=f.a.astype(np.float32), b=f.b.astype(np.float32), scale=f.scale)
