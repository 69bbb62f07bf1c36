"""Canonical LoRA factor layout and the factored linear algebra the server needs (numpy only).

Layout (identical to PEFT; docs/algorithms.md, "Factor layout") for a module with W0 ∈ ℝ^{m×n}:

    a: (r, n)   = lora_A.weight
    b: (m, r)   = lora_B.weight          (unscaled)
    ΔW = scale · b @ a ∈ ℝ^{m×n}

Server math uses the scale-folded b̃ = scale·b so that ΔW = b̃ @ a whatever the client's scale.
A change of the frozen base is kept factored: W_base += u @ v with u: (m, q), v: (q, n), always in
nn.Linear orientation (m×n); `raysim.lora.peft_io.fold_into_base` is the only code that writes it
into a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DENSE_LIMIT = 1 << 20  # modules with m·n at most this are materialised densely (docs/algorithms.md, "Norms and SVDs of factored products")


@dataclass
class LoRAFactors:
    """One module's adapter: a (r, n), b (m, r) unscaled, scale s; optional tri-matrix core c (r, r)."""

    a: np.ndarray
    b: np.ndarray
    scale: float
    c: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the module's weight."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def b_tilde(self) -> np.ndarray:
        """Scale-folded b̃ = s·b (m, r); with a core c, b̃ = s·b·c so that ΔW = b̃ @ a."""
        b = self.b if self.c is None else self.b @ self.c
        return self.scale * b

    def product(self) -> np.ndarray:
        """Dense ΔW = s·b·(c)·a, (m, n)."""
        return self.b_tilde() @ self.a

    def copy(self) -> "LoRAFactors":
        return LoRAFactors(self.a.copy(), self.b.copy(), float(self.scale),
                           None if self.c is None else self.c.copy())

    def numel(self, names: tuple[str, ...] | frozenset[str] = ("a", "b")) -> int:
        return int(sum(getattr(self, n).size for n in names if getattr(self, n) is not None))


Factors = dict[str, LoRAFactors]


def fold_core(factors: Factors) -> Factors:
    """Tri-matrix factors as plain LoRA factors with the same ΔW: b ← b·c, c dropped (export, evaluation)."""
    return {name: f if f.c is None else LoRAFactors(a=f.a, b=(f.b @ f.c).astype(f.b.dtype), scale=f.scale)
            for name, f in factors.items()}


@dataclass
class BaseDelta:
    """Factored change of one module's frozen weight: ΔW_base = u @ v, u (m, q), v (q, n)."""

    u: np.ndarray
    v: np.ndarray

    def dense(self) -> np.ndarray:
        return self.u @ self.v

    def numel(self) -> int:
        """Scalars needed to send it: factored q(m+n), or dense m·n if that is smaller."""
        m, q = self.u.shape
        n = self.v.shape[1]
        return int(min(m * n, q * (m + n)))


def product_fro_norm(p: np.ndarray, m: np.ndarray) -> float:
    """‖p @ m‖_F for p (rows, q), m (q, cols) without forming the product (QR form, float64, stable).

    Uses the dense product when rows·cols ≤ DENSE_LIMIT (as cheap, and exact to round-off).
    """
    p = np.asarray(p, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    if p.shape[1] == 0:
        return 0.0
    if p.shape[0] * m.shape[1] <= DENSE_LIMIT or p.shape[1] >= min(p.shape[0], m.shape[1]):
        return float(np.linalg.norm(p @ m))
    _, r1 = np.linalg.qr(p)          # p = q1 r1,   r1: (q, q)
    _, r2 = np.linalg.qr(m.T)        # mᵀ = q2 r2,  r2: (q, q)
    return float(np.linalg.norm(r1 @ r2.T))


def ideal_update(updates: list[tuple[float, LoRAFactors]]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked factors of ΔW* = Σ_k p_k s_k B_k A_k: U = [p_k b̃_k] (m, q), V = [A_k] (q, n), float64."""
    u = np.concatenate([w * f.b_tilde().astype(np.float64) for w, f in updates], axis=1)
    v = np.concatenate([f.a.astype(np.float64) for _, f in updates], axis=0)
    return u, v


@dataclass
class DeviationReport:
    deviation_rel: float          # ‖ΔW* − ΔW_applied‖ / ‖ΔW*‖ over all modules (NaN if ‖ΔW*‖≈0)
    deviation_rel_round: float    # same, denominators ‖ΔW* − previous global product‖
    per_module: dict[str, float] = field(default_factory=dict)


def deviation(
    updates: dict[str, list[tuple[float, LoRAFactors]]],
    new_global: Factors,
    base_delta: dict[str, BaseDelta] | None,
    old_global: Factors | None = None,
) -> DeviationReport:
    """deviation_rel (docs/algorithms.md, "Deviation metric"), from what clients uploaded and what the server applied.

    updates[module] = [(p_k, client factors)], Σ p_k = 1; new_global: the global adapter after this
    round; base_delta: this round's change of W_base (None if the base did not change).
    """
    num2 = den2 = den_round2 = 0.0
    per_module = {}
    for name, ups in updates.items():
        u, v = ideal_update(ups)                                           # ΔW* = u @ v
        g = new_global[name]
        left = [u, -g.b_tilde().astype(np.float64)]
        right = [v, g.a.astype(np.float64)]
        if base_delta is not None and name in base_delta:
            left.append(-base_delta[name].u.astype(np.float64))
            right.append(base_delta[name].v.astype(np.float64))
        d = product_fro_norm(np.concatenate(left, axis=1), np.concatenate(right, axis=0))
        star = product_fro_norm(u, v)
        if old_global is not None and name in old_global:
            og = old_global[name]
            inc = product_fro_norm(np.concatenate([u, -og.b_tilde().astype(np.float64)], axis=1),
                                   np.concatenate([v, og.a.astype(np.float64)], axis=0))
        else:
            inc = star
        num2 += d * d
        den2 += star * star
        den_round2 += inc * inc
        per_module[name] = d / star if star > 1e-12 else float("nan")
    rel = float(np.sqrt(num2 / den2)) if den2 > 1e-24 else float("nan")
    rel_round = float(np.sqrt(num2 / den_round2)) if den_round2 > 1e-24 else float("nan")
    return DeviationReport(rel, rel_round, per_module)


# ----------------------------------------------------------------------------- weights


def normalise_weights(raw: np.ndarray | list[float]) -> np.ndarray:
    """p_k = ω_k / Σ ω_j (docs/algorithms.md, "Client weights"). Raises if all weights are zero."""
    w = np.asarray(raw, dtype=np.float64)
    if np.any(w < 0):
        raise ValueError("client weights must be >= 0")
    total = w.sum()
    if total <= 0:
        raise ValueError("client weights sum to 0")
    return w / total
