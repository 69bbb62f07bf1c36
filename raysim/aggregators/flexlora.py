"""FlexLoRA: average the full-size products, SVD, send each client its rank-r_j truncation (arXiv 2402.11505)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from raysim.aggregators.base import (AggregateResult, Aggregator, ClientPlan, ClientUpdate, MethodParams,
                                     derived_rng, kaiming_a, register)
from raysim.lora.factors import Factors, LoRAFactors, ideal_update


class FlexLoRAParams(MethodParams):
    split: Literal["even", "us_v"] = Field(
        "even", description="how Σ is split between the factors: 'even' (B̃ = YΣ^½, A = Σ^½Zᵀ) or "
                            "'us_v' (B̃ = YΣ, A = Zᵀ); the product is the same")


def thin_svd(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact thin SVD of u @ v = Y·diag(σ)·Zᵀ without forming it while q < min(m, n).

    u (m, q), v (q, n) -> Y (m, k), σ (k,) descending, Z (n, k), k = min(q, m, n); float64. QR of both
    stacked factors, then the SVD of the q×q core R₁R₂ᵀ; the dense SVD only when q ≥ min(m, n).
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    m, q = u.shape
    n = v.shape[1]
    if q >= min(m, n):
        y, sigma, zt = np.linalg.svd(u @ v, full_matrices=False)   # (m, k), (k,), (k, n)
        return y, sigma, zt.T
    q1, r1 = np.linalg.qr(u)              # u = q1 r1,   q1 (m, q), r1 (q, q)
    q2, r2 = np.linalg.qr(v.T)            # vᵀ = q2 r2,  q2 (n, q), r2 (q, q)
    core_u, sigma, core_vt = np.linalg.svd(r1 @ r2.T)                 # (q, q), (q,), (q, q)
    return q1 @ core_u, sigma, q2 @ core_vt.T


def numerical_rank(sigma: np.ndarray, shape: tuple[int, int]) -> int:
    """Number of σ_i above max(m, n)·eps·σ₁ (numpy's matrix_rank rule)."""
    if sigma.size == 0 or sigma[0] <= 0:
        return 0
    return int(np.sum(sigma > sigma[0] * max(shape) * np.finfo(np.float64).eps))


def tail_energy(sigma: np.ndarray, rank: int) -> float:
    """Σ_{i>rank} σ_i² = ‖ΔW* − best rank-`rank` approximation‖_F² (Eckart–Young)."""
    return float(np.sum(sigma[rank:] ** 2))


def svd_truncation(y: np.ndarray, sigma: np.ndarray, z: np.ndarray, rank: int, scale: float, split: str,
                   rng_for_fill) -> LoRAFactors:
    """Rank-`rank` factors of Y·Σ·Zᵀ for a client of scale `scale` (b = B̃/scale), float64.

    Slots beyond the numerical rank ("dead" slots: A-row and B-column both 0 would never train) get
    a Kaiming-uniform A-row from `rng_for_fill()` and a zero B-column: the product is unchanged.
    """
    m, n = y.shape[0], z.shape[0]
    t = min(rank, numerical_rank(sigma, (m, n)))
    if split == "even":
        root = np.sqrt(sigma[:t])
        bt, a = y[:, :t] * root, root[:, None] * z[:, :t].T                    # (m, t), (t, n)
    else:
        bt, a = y[:, :t] * sigma[:t], z[:, :t].T.copy()
    a_full = np.zeros((rank, n))
    b_full = np.zeros((m, rank))
    a_full[:t] = a
    b_full[:, :t] = bt / scale
    if rank > t:
        a_full[t:] = kaiming_a(rank - t, n, rng_for_fill())
    return LoRAFactors(a=a_full, b=b_full, scale=scale)


@register("flexlora")
class FlexLoRA(Aggregator):
    """FlexLoRA: ΔW* = Σ p_k B̃_k A_k, exact thin SVD, each client gets its best rank-r_j truncation.

    The server keeps ΔW* = Y·Σ·Zᵀ per module (from QR of the stacked factors). Client j (rank r_j,
    scale s_j) starts from B̃_j = Y_{:r_j} Σ^½, A_j = Σ^½ Z_{:r_j}ᵀ (`split: us_v`: B̃ = YΣ, A = Zᵀ); slots
    beyond rank(ΔW*) get a fresh Kaiming A-row (seed from (seed, round, client, module)) and a zero
    B-column. Before the first aggregation clients start from the truncated init. `global_factors`
    (the evaluated adapter) is the truncation at r_max = max client rank, since a worker model holds at
    most r_max slots; stats report its relative truncation error. deviation_rel is the p-weighted
    truncation error of this round's clients, sqrt(Σ_l Σ_k p_k Σ_{i>r_k} σ²) / sqrt(Σ_l ‖ΔW*_l‖²).
    """

    exact = False
    mixed_ranks = True
    uploads = "A_k (r_k×n), B_k (m×r_k)"
    broadcasts = "per client, the rank-r_j SVD truncation of ΔW*"
    comm_per_module = "up r_k(m+n), down r_j(m+n)"
    Params = FlexLoRAParams
    global_state = Aggregator.global_state + ("svd",)
    svd: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None     # module -> (Y, σ, Z) of ΔW*

    def reset_state(self) -> None:
        super().reset_state()
        self.svd = None         # before the first aggregation: clients start from the truncated init

    def _truncate(self, rank: int, scale: float, *keys: int | str) -> Factors:
        out = {}
        for name, (y, sigma, z) in self.svd.items():
            g = self.global_factors[name]
            f = svd_truncation(y, sigma, z, rank, scale, self.params.split,
                               lambda name=name: derived_rng(self.seed, *keys, name))
            out[name] = LoRAFactors(a=f.a.astype(g.a.dtype), b=f.b.astype(g.b.dtype), scale=scale)
        return out

    def plan(self, rnd: int, client_id: int) -> ClientPlan:
        if self.svd is None:
            return super().plan(rnd, client_id)                    # truncation of the init
        rank = self.client_ranks[client_id]
        return ClientPlan(start=self._truncate(rank, self.scale_of_rank(rank), rnd, client_id))

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        r_max = max(self.client_ranks.values())
        svd = {}
        star2 = client_tail2 = global_tail2 = 0.0
        q = svd_rank = 0
        for name in self.global_factors:
            u, v = ideal_update([(up.weight, up.factors[name]) for up in updates])    # (m, q), (q, n)
            y, sigma, z = thin_svd(u, v)
            svd[name] = (y, sigma, z)
            star2 += float(np.sum(sigma ** 2))
            client_tail2 += sum(up.weight * tail_energy(sigma, self.client_ranks.get(up.client_id,
                                                                                     up.factors[name].rank))
                                for up in updates)
            global_tail2 += tail_energy(sigma, r_max)
            q = max(q, u.shape[1])
            svd_rank = max(svd_rank, numerical_rank(sigma, (u.shape[0], v.shape[1])))
        self.svd = svd
        self.global_factors = self._truncate(r_max, self.scale_of_rank(r_max), rnd, "global")
        nan = float("nan")
        return AggregateResult(
            deviation_rel=float(np.sqrt(client_tail2 / star2)) if star2 > 1e-24 else nan,
            stats={"global_trunc_err_rel": float(np.sqrt(global_tail2 / star2)) if star2 > 1e-24 else nan,
                   "stack_rank": float(q), "svd_rank": float(svd_rank)})
