"""FlexLoRA: average the full-size products, SVD, send each client its rank-r_j truncation (arXiv 2402.11505)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from raysim.aggregators.base import (AggregateResult, Aggregator, ClientPlan, ClientUpdate, MethodParams,
                                     derived_rng, kaiming_a, register)
from raysim.lora.factors import BaseDelta, Factors, LoRAFactors, ideal_update, prefer_dense, sum_norms


class FlexLoRAParams(MethodParams):
    split: Literal["even", "us_v"] = Field(
        "even", description="how Σ is split between the factors: 'even' (B̃ = YΣ^½, A = Σ^½Zᵀ) or "
                            "'us_v' (B̃ = YΣ, A = Zᵀ); the product is the same")


def thin_svd(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact thin SVD of u @ v = Y·diag(σ)·Zᵀ, k = min(q, m, n) triplets, float64 (all of them)."""
    op = factored_operator(u, v)
    cy, sigma, czt = np.linalg.svd(op.core, full_matrices=False)
    return op.lift_left(cy), sigma, op.lift_right(czt.T)


@dataclass
class Operator:
    """ΔW* = Q₁·core·Q₂ᵀ with orthonormal Q₁ (m, k₁), Q₂ (n, k₂); Q None = identity (the dense core)."""

    core: np.ndarray
    q1: np.ndarray | None = None
    q2: np.ndarray | None = None

    def lift_left(self, x: np.ndarray) -> np.ndarray:
        return x if self.q1 is None else self.q1 @ x

    def lift_right(self, x: np.ndarray) -> np.ndarray:
        return x if self.q2 is None else self.q2 @ x


def factored_operator(u: np.ndarray, v: np.ndarray) -> Operator:
    """u @ v as an Operator: the dense product, or QR of both stacked factors and the core R₁R₂ᵀ, whichever
    the cost rule (2mnq vs ≈2(m+n)q²) finds cheaper."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if prefer_dense(u.shape[0], v.shape[1], u.shape[1]):
        return Operator(u @ v)
    q1, r1 = np.linalg.qr(u)              # u = q1 r1,   q1 (m, k1), r1 (k1, q)
    q2, r2 = np.linalg.qr(v.T)            # vᵀ = q2 r2,  q2 (n, k2), r2 (k2, q)
    return Operator(r1 @ r2.T, q1, q2)


@dataclass
class Truncation:
    """What FlexLoRA keeps of one module's ΔW*: the top triplets, the tail energies
    ‖ΔW* − best rank-r approximation‖² for the ranks asked for (r = 0 gives ‖ΔW*‖²), the numerical rank
    (None when only the top triplets were computed) and the tail ΔW* − Y·Σ·Zᵀ as a base-delta pair."""

    y: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    tail2: dict[int, float]
    rank: int | None
    tail: tuple[np.ndarray, np.ndarray | None] | None


def truncated_svd(op: Operator, r_max: int, ranks: set[int], shape: tuple[int, int]) -> Truncation:
    """The top r_max triplets of the operator and the tail energies at `ranks` (and 0, r_max): the full SVD
    of a core of at most 2·r_max rows or columns (or a badly conditioned one), else the top eigenpairs of
    the core's smaller Gram matrix."""
    core = op.core
    ranks = sorted(set(ranks) | {0, r_max})
    if min(core.shape) > 2 * r_max:
        top = _gram_top(core, r_max)
        if top is not None:
            return _from_top(op, *top, ranks)
    cy, sigma, czt = np.linalg.svd(core, full_matrices=False)
    t = numerical_rank(sigma, shape)
    y, z = op.lift_left(cy[:, :r_max]), op.lift_right(czt[:r_max].T)
    tail = None
    if t > r_max:
        tail = (op.lift_left(cy[:, r_max:t] * sigma[r_max:t]), op.lift_right(czt[r_max:t].T).T.copy())
    return Truncation(y, sigma[:r_max].copy(), z, {r: tail_energy(sigma, r) for r in ranks}, t, tail)


def _gram_top(core: np.ndarray, r_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(Yc, σ, Zc) of the core's top r_max triplets from its Gram matrix; None when σ_{r_max} < 1e-4·σ₁
    (the Gram matrix squares the condition number: such triplets need the SVD)."""
    wide = core.shape[0] < core.shape[1]
    gram = core @ core.T if wide else core.T @ core
    lam, vec = top_eigenpairs(gram, r_max)
    if not lam[0] > 0 or lam[-1] < 1e-8 * lam[0]:
        return None
    sigma = np.sqrt(lam)
    if wide:
        return vec, sigma, (vec.T @ core).T / sigma          # left vectors from the Gram, right = coreᵀy/σ
    return core @ vec / sigma, sigma, vec


LANCZOS_MIN_ORDER = 64        # below this order LAPACK's eigh is as fast as Lanczos


def top_eigenpairs(gram: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The r largest eigenpairs of a symmetric positive semi-definite matrix, largest first.

    Lanczos (ARPACK, converged to machine precision) touches the matrix only through products with
    vectors and costs about half of LAPACK's tridiagonal reduction at the orders of real adapters; its
    answer is kept only when `none_missed` proves it is the top r, else LAPACK's eigh is taken."""
    import scipy.linalg                      # here, not at the top: config checks on the driver import this module
    import scipy.sparse.linalg

    k = gram.shape[0]
    if k >= max(LANCZOS_MIN_ORDER, 2 * r + 2):
        start = np.random.default_rng(0).standard_normal(k)            # fixed: the same result on every run
        try:
            lam, vec = scipy.sparse.linalg.eigsh(gram, k=r, which="LA", tol=0, v0=start)
        except scipy.sparse.linalg.ArpackError:
            lam = None
        if lam is not None:
            order = np.argsort(lam)[::-1]
            lam, vec = lam[order], np.ascontiguousarray(vec[:, order])
            if none_missed(gram, lam, vec):
                return lam, vec
    lam, vec = scipy.linalg.eigh(gram, subset_by_index=[k - r, k - 1], driver="evr")
    return lam[::-1], np.ascontiguousarray(vec[:, ::-1])


def none_missed(gram: np.ndarray, lam: np.ndarray, vec: np.ndarray) -> bool:
    """Whether (lam, vec), largest first, hold every eigenvalue of `gram` above lam[-1]: with the pairs
    deflated, t·I − (gram − V·Λ·Vᵀ) must be positive definite (its Cholesky factorisation succeeds) for
    t = lam[-1] + 1e-9·lam[0]. An eigenvalue a Krylov method missed would remain above t; ties within
    1e-9·lam[0] of lam[-1] are equally good truncations."""
    import scipy.linalg

    if not lam[0] > 0:
        return False
    rest = (vec * lam) @ vec.T
    rest -= gram
    rest[np.diag_indices_from(rest)] += lam[-1] + 1e-9 * lam[0]
    return scipy.linalg.lapack.dpotrf(rest, lower=True, clean=False, overwrite_a=True)[1] == 0


def _from_top(op: Operator, cy: np.ndarray, sigma: np.ndarray, cz: np.ndarray, ranks: list[int]) -> Truncation:
    """Tail energies as ‖core − Σ_{i<r} σ_i y_i z_iᵀ‖² (accurate however small), and the tail beyond r_max
    as the last residual: dense (the core is ΔW*) or in the QR bases."""
    residual = op.core.copy()
    tail2, done = {}, 0
    for r in ranks:
        if r > done:
            residual -= (cy[:, done:r] * sigma[done:r]) @ cz[:, done:r].T
            done = r
        flat = residual.ravel()
        tail2[r] = float(np.dot(flat, flat))
    tail = (residual, None) if op.q1 is None else (op.q1 @ residual, op.q2.T.copy())
    return Truncation(op.lift_left(cy), sigma, op.lift_right(cz), tail2, None, tail)


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
    B-column. Before the first aggregation clients start from the truncated init. The frozen base never
    changes. ◆ The global model is W0 + ΔW* at full rank: `global_factors` (the evaluated and exported
    adapter) is the truncation at r_max = max client rank, which a worker's model can hold, and
    `evaluation_base_delta()` the rest, Σ_{i≥r_max} σ_i y_i z_iᵀ; clients never train on it. Only what is
    used is computed and kept (docs/algorithms.md, FlexLoRA): ΔW* as the dense product or QR of the stacked
    factors (the cost rule), the top r_max triplets (full SVD of a small core, else the top eigenpairs of
    its Gram matrix), ‖ΔW*‖², the tail energies at the clients' ranks and the tail beyond r_max.
    deviation_rel is the p-weighted truncation error of this round's clients,
    sqrt(Σ_l Σ_k p_k Σ_{i>r_k} σ²) / sqrt(Σ_l ‖ΔW*_l‖²); deviation_rel_round divides the same by
    sqrt(Σ_l ‖ΔW*_l − previous global ΔW_l‖²). Stats: the r_max adapter's relative truncation error,
    the stack width q and the numerical rank of ΔW* (NaN where only the top triplets were computed).
    """

    exact = False
    mixed_ranks = True
    uploads = "A_k (r_k×n), B_k (m×r_k)"
    broadcasts = "per client, the rank-r_j SVD truncation of ΔW*"
    comm_per_module = "up r_k(m+n), down r_j(m+n)"
    Params = FlexLoRAParams
    global_state = Aggregator.global_state + ("svd", "tail")
    svd: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None     # module -> top r_max (Y, σ, Z) of ΔW*
    tail: dict[str, tuple[np.ndarray, np.ndarray | None]]              # module -> ΔW* − YΣZᵀ, (u, v) or (dense, None)

    def reset_state(self) -> None:
        super().reset_state()
        self.svd = None         # before the first aggregation: clients start from the truncated init
        self.tail = {}

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

    def evaluation_base_delta(self) -> dict[str, BaseDelta] | None:
        """ΔW* beyond the r_max adapter per module: factored Y_{:, r_max:t}·Σ·Z_{:, r_max:t}ᵀ (t = numerical
        rank), in the QR bases of the stacked factors, or dense (v None) where ΔW* was formed densely."""
        return {name: BaseDelta(u, v) for name, (u, v) in self.tail.items()} or None

    def _previous_terms(self, name: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The previous global ΔW as terms of `sum_norms`: the full-rank ΔW* (top triplets and tail), or
        the init adapter."""
        if self.svd is None:
            g = self.global_factors[name]
            return [(g.b_tilde().astype(np.float64), g.a.astype(np.float64))]
        y, sigma, z = self.svd[name]
        return [(y * sigma, z.T)] + ([self.tail[name]] if name in self.tail else [])

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        r_max = self.max_client_rank
        ranks = {min(r_max, self.client_ranks.get(up.client_id, r_max)) for up in updates}
        svd, tail, buffers = {}, {}, {}
        star2 = client_tail2 = global_tail2 = increment2 = 0.0
        q, svd_ranks = 0, []
        for name in self.global_factors:
            u, v = ideal_update([(up.weight, up.factors[name]) for up in updates], buffers)   # (m, q), (q, n)
            m, n = u.shape[0], v.shape[1]
            op = factored_operator(u, v)
            now = [(op.core, None)] if op.q1 is None else [(u, v)]                  # ΔW*, formed once
            prev = self._previous_terms(name)
            increment2 += sum_norms(now + prev, [[1.0] + [-1.0] * len(prev)])[0] ** 2
            trunc = truncated_svd(op, r_max, ranks, (m, n))
            svd[name] = (trunc.y, trunc.sigma, trunc.z)
            if trunc.tail is not None:
                tail[name] = trunc.tail
            star2 += trunc.tail2[0]
            client_tail2 += sum(up.weight * trunc.tail2[min(r_max, self.client_ranks.get(up.client_id, r_max))]
                                for up in updates)
            global_tail2 += trunc.tail2[r_max]
            q = max(q, u.shape[1])
            svd_ranks.append(trunc.rank)
        self.svd, self.tail = svd, tail
        self.global_factors = self._truncate(r_max, self.scale_of_rank(r_max), rnd, "global")
        rel = (lambda num2, den2: float(np.sqrt(num2 / den2)) if den2 > 1e-24 else float("nan"))
        return AggregateResult(
            deviation_rel=rel(client_tail2, star2), deviation_rel_round=rel(client_tail2, increment2),
            stats={"global_trunc_err_rel": rel(global_tail2, star2), "stack_rank": float(q),
                   "svd_rank": float("nan") if None in svd_ranks else float(max(svd_ranks, default=0))})

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        """Also reads checkpoints that kept the full SVD and no tail (the tail is cut from it)."""
        if "tail" in meta["global"]:
            super().load_state_dict(tensors, meta)
            return
        meta = {"global": {**meta["global"], "tail": {"dict": []}}, "client": meta["client"]}
        super().load_state_dict(tensors, meta)
        for name, (y, sigma, z) in (self.svd or {}).items():
            r_max = self.global_factors[name].rank
            t = numerical_rank(sigma, (y.shape[0], z.shape[0]))
            if t > r_max:
                self.tail[name] = (y[:, r_max:t] * sigma[r_max:t], z[:, r_max:t].T.copy())
            self.svd[name] = (y[:, :r_max].copy(), sigma[:r_max].copy(), z[:, :r_max].copy())
