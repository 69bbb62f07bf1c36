"""FedEx-LoRA: exact aggregation by folding the residual into the frozen base (arXiv 2410.09432)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import ClientUpdate, register
from raysim.aggregators.fedit import FedIT
from raysim.lora.factors import BaseDelta, Factors


def fedex_residual(updates: list[ClientUpdate], mean: Factors) -> dict[str, BaseDelta]:
    """R = Σ p_k B̃_k A_k − B̃̄ Ā, factored with the redundant block dropped (docs/algorithms.md, FedEx-LoRA).

    Equal ranks: R_U = [p_k (B̃_k − B̃_K)]_{k<K} (m, (K−1)r), R_V = [A_k − Ā]_{k<K} ((K−1)r, n), float64.
    Identity used: Σ_k p_k (B̃_k − B̃̄)(A_k − Ā) = Σ_k p_k (B̃_k − B̃_ref)(A_k − Ā) for any ref, since
    Σ p_k (A_k − Ā) = 0; the ref block vanishes. R is m×n in nn.Linear orientation (out × in).
    K = 1 gives an empty R (= 0).

    Mixed ranks (`mean` = the zero-padded average at the global rank r_g): every client is zero-padded,
    ref is the last client of the smallest rank, so B̂_k − B̂_ref lives in the first r_k columns and
    block k is p_k (B̃_k − B̂_ref[:, :r_k]) · (A_k − Ā[:r_k]): rank ≤ Σ r_k − r_min. Slots r_up … r_g−1
    (r_up = max r_k) have owners' share π_j = 0 and were kept from the previous global; their product
    is in B̃̄·Ā but not in ΔW*, so R gets the extra block −B̃̄[:, r_up:] · Ā[r_up:].

    Clients of weight 0 are left out first (their blocks are 0, and the slots only they own have π_j = 0
    and were kept like unowned ones), so a client of weight 0 changes nothing.
    """
    updates = [u for u in updates if u.weight != 0]
    out = {}
    for name, g in mean.items():
        a_bar = g.a                                                    # (r_g, n)
        m, n = g.b.shape[0], g.a.shape[1]
        ranks = [u.factors[name].rank for u in updates]
        r_min = min(ranks)
        ref = max(i for i, r in enumerate(ranks) if r == r_min)        # equal ranks: the last client
        ref_bt = updates[ref].factors[name].b_tilde().astype(np.float64)   # B̃_ref (m, r_min)
        us, vs = [], []
        for i, u in enumerate(updates):
            if i == ref:
                continue
            f = u.factors[name]
            r = f.rank
            ref_pad = ref_bt if r == r_min else np.pad(ref_bt, ((0, 0), (0, r - r_min)))
            us.append(u.weight * (f.b_tilde().astype(np.float64) - ref_pad))
            vs.append(f.a.astype(np.float64) - a_bar[:r])
        r_up = max(ranks)
        if g.rank > r_up:                                              # slots kept from the old global
            us.append(-g.b_tilde().astype(np.float64)[:, r_up:])
            vs.append(np.asarray(a_bar[r_up:], dtype=np.float64))
        u_mat = np.concatenate(us, axis=1) if us else np.zeros((m, 0))
        v_mat = np.concatenate(vs, axis=0) if vs else np.zeros((0, n))
        out[name] = BaseDelta(u=u_mat, v=v_mat)
    return out


@register("fedex")
class FedExLoRA(FedIT):
    """FedIT plus the residual Σ p_k s B_k A_k − s B̄ Ā folded into the frozen base: exact.

    Clients continue from (Ā, B̄) after folding R (sent factored, rank ≤ (K−1)r, or dense if smaller).
    Mixed ranks: Ā, B̄ are the zero-padded slot-wise averages (as FedIT), each client starts from the
    first r_k slots, and R = Σ p_k B̃_k A_k − B̃̄ Ā with the zero-padded global keeps it exact.
    """

    exact = True
    changes_base = True
    broadcasts = "A_g, B_g + residual R (factored, rank ≤ (K−1)r)"
    comm_per_module = "up r(m+n), down r(m+n) + min(mn, (K−1)r(m+n))"

    def base_change(self, updates: list[ClientUpdate], mean: Factors) -> dict[str, BaseDelta]:
        return fedex_residual(updates, mean)
