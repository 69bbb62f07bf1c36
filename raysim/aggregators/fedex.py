"""FedEx-LoRA: exact aggregation by folding the residual into the frozen base (arXiv 2410.09432)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import AggregateResult, Aggregator, ClientUpdate, register
from raysim.aggregators.fedit import _to32, average_factors
from raysim.lora.factors import BaseDelta, Factors, LoRAFactors


def fedex_residual(updates: list[ClientUpdate], mean: Factors) -> dict[str, BaseDelta]:
    """R = Σ p_k B̃_k A_k − B̃̄ Ā, factored with the redundant last block dropped (ALGORITHMS.md §2.2).

    R_U = [p_k (B̃_k − B̃_K)]_{k<K}  (m, (K−1)r),   R_V = [A_k − Ā]_{k<K}  ((K−1)r, n),   float64.
    Identity used: Σ_k p_k (B̃_k − B̃̄)(A_k − Ā) = Σ_{k<K} p_k (B̃_k − B̃_K)(A_k − Ā), since Σ p_k (A_k − Ā) = 0.
    R is m×n in nn.Linear orientation (the orientation of W0, out × in). K = 1 gives an empty R (= 0).
    """
    out = {}
    for name, g in mean.items():
        a_bar = g.a                                                    # (r, n)
        last = updates[-1].factors[name].b_tilde().astype(np.float64)  # B̃_K (m, r)
        us = [u.weight * (u.factors[name].b_tilde().astype(np.float64) - last) for u in updates[:-1]]
        vs = [u.factors[name].a.astype(np.float64) - a_bar for u in updates[:-1]]
        m, n = g.b.shape[0], g.a.shape[1]
        u_mat = np.concatenate(us, axis=1) if us else np.zeros((m, 0))
        v_mat = np.concatenate(vs, axis=0) if vs else np.zeros((0, n))
        out[name] = BaseDelta(u=u_mat, v=v_mat)
    return out


@register("fedex")
class FedEx(Aggregator):
    """FedAvg of A and B plus the residual Σ p_k s B_k A_k − s B̄ Ā folded into the frozen base: exact.

    Clients continue from (Ā, B̄) after folding R (sent factored, rank ≤ (K−1)r, or dense if smaller).
    """

    exact = True
    changes_base = True
    uploads = "A_k (r×n), B_k (m×r)"
    broadcasts = "A_g, B_g + residual R (factored, rank ≤ (K−1)r)"
    comm_per_module = "up r(m+n), down r(m+n) + min(mn, (K−1)r(m+n))"

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        scale = next(iter(self.global_factors.values())).scale
        mean = average_factors(updates, scale)
        residual = fedex_residual(updates, mean)
        self.global_factors = {k: _to32(f) for k, f in mean.items()}
        return AggregateResult(base_delta=residual)
