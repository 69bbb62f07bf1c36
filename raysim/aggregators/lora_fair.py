"""LoRA-FAIR: FedAvg plus a server-side correction ΔB of B̄ toward ΔW* (arXiv 2411.14961)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from raysim.aggregators.base import AggregateResult, Aggregator, ClientUpdate, MethodParams, register, weighted_mean
from raysim.lora.factors import LoRAFactors, ideal_update, product_fro_norm


class LoRAFairParams(MethodParams):
    lam: float = Field(0.01, ge=0, description="λ, weight of the unsquared ‖ΔB‖_F term (paper: 0.01)")
    solver: Literal["adam", "ls", "ls_ridge"] = Field(
        "adam", description="'adam': the paper's objective, best iterate kept; 'ls': closed-form least "
                            "squares (λ ignored); 'ls_ridge': least squares with ridge μ toward B̄")
    steps: int = Field(200, ge=0, description="Adam steps per module")
    lr_factor: float = Field(0.01, gt=0, description="Adam learning rate = lr_factor · RMS(B̄)")
    mu: float = Field(0.0, ge=0, description="ridge μ of 'ls_ridge' (absolute, added to ĀĀᵀ)")
    eps: float = Field(1e-8, ge=0, description="relative regulariser of 'ls'/'ls_ridge': ε = eps·tr(ĀĀᵀ)/r")


class FairProblem:
    """One module's correction problem in factored form, float64.

    f(ΔB) = 1 − cos(ΔW*, s(B̄+ΔB)Ā) + λ‖ΔB‖_F. With B′ = s(B̄+ΔB) (m, r), c = ΔW*Āᵀ = U(VĀᵀ) (m, r) and
    G = ĀĀᵀ (r, r): ⟨ΔW*, B′Ā⟩ = ⟨c, B′⟩ and ‖B′Ā‖² = Σ (B′ᵀB′) ⊙ G, so a step costs O(m·r²).
    """

    def __init__(self, u: np.ndarray, v: np.ndarray, a_bar: np.ndarray, b_bar: np.ndarray, scale: float):
        self.scale = scale
        self.b_bar = b_bar                                   # (m, r) unscaled
        self.gram = a_bar @ a_bar.T                          # G = ĀĀᵀ (r, r)
        self.c = u @ (v @ a_bar.T)                           # ΔW*Āᵀ (m, r)
        self.star_norm = product_fro_norm(u, v)              # ‖ΔW*‖_F

    def cos(self, db: np.ndarray) -> float:
        bp = self.scale * (self.b_bar + db)
        y2 = float(np.sum((bp.T @ bp) * self.gram))
        if y2 <= 0 or self.star_norm <= 0:
            return 0.0
        return float(np.sum(self.c * bp)) / (self.star_norm * np.sqrt(y2))

    def value_and_grad(self, db: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
        bp = self.scale * (self.b_bar + db)                                   # B′ (m, r)
        bg = bp @ self.gram                                                   # B′G (m, r)
        inner = float(np.sum(self.c * bp))                                   # ⟨ΔW*, B′Ā⟩
        y = np.sqrt(max(float(np.sum(bp * bg)), 1e-300))                    # ‖B′Ā‖_F
        xy = self.star_norm * y
        cos = inner / xy
        grad = -self.scale * (self.c / xy - (inner / (xy * y * y)) * bg)     # ∂(1 − cos)/∂ΔB
        norm = float(np.linalg.norm(db))
        if norm > 0:
            grad = grad + lam * db / norm
        return 1.0 - cos + lam * norm, grad

    def solve_adam(self, lam: float, steps: int, lr: float) -> np.ndarray:
        """Adam from ΔB = 0; returns the best iterate seen (ΔB = 0 included)."""
        beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
        db = np.zeros_like(self.b_bar)
        m1 = np.zeros_like(db)
        m2 = np.zeros_like(db)
        best_val, grad = self.value_and_grad(db, lam)
        best = db.copy()
        for t in range(1, steps + 1):
            m1 = beta1 * m1 + (1 - beta1) * grad
            m2 = beta2 * m2 + (1 - beta2) * grad * grad
            db = db - lr * (m1 / (1 - beta1 ** t)) / (np.sqrt(m2 / (1 - beta2 ** t)) + adam_eps)
            val, grad = self.value_and_grad(db, lam)
            if val < best_val:
                best_val, best = val, db.copy()
        return best

    def solve_ls(self, ridge: float) -> np.ndarray:
        """ΔB = (ΔW*/s − B̄Ā)Āᵀ(G + ridge·I)⁻¹ = (c/s − B̄G)(G + ridge·I)⁻¹ (zero when ΔW* = sB̄Ā)."""
        rhs = self.c / self.scale - self.b_bar @ self.gram                   # (m, r)
        lhs = self.gram + ridge * np.eye(self.gram.shape[0])                 # symmetric (r, r)
        return np.linalg.solve(lhs, rhs.T).T


@register("lora_fair")
class LoRAFair(Aggregator):
    """LoRA-FAIR: FedAvg, then B_g = B̄ + ΔB with ΔB maximising cos(ΔW*, s(B̄+ΔB)Ā) − λ‖ΔB‖, per module.

    Each module is corrected independently, all terms in factored form (docs/algorithms.md, LoRA-FAIR);
    A_g = Ā. Solvers: `adam` (float64 Adam with analytic gradients, lr = lr_factor·RMS(B̄), best iterate kept,
    ΔB = 0 included, so the objective never rises), `ls` (ΔB = (ΔW*/s − B̄Ā)Āᵀ(ĀĀᵀ+εI)⁻¹, which at ε → 0
    attains the largest cosine among matrices with rows in Ā's row space, ΔW*·Π_Ā) and `ls_ridge` (the
    same with ĀĀᵀ + (μ+ε)I). Modules with ΔW* = 0 (for adam also B̄Ā = 0, for ls Ā = 0) are skipped
    (ΔB = 0). Stats: mean over modules of cos before/after and of ‖ΔB‖_F/‖B̄‖_F. Not exact; equal
    ranks only.
    """

    exact = False
    uploads = "A_k (r×n), B_k (m×r)"
    broadcasts = "Ā, B̄ + ΔB"
    comm_per_module = "up r(m+n), down r(m+n)"
    Params = LoRAFairParams

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        weights = [u.weight for u in updates]
        p = self.params
        new, before, after, rel = {}, [], [], []
        skipped = 0
        for name, g in self.global_factors.items():
            scale = float(g.scale)
            a_bar = weighted_mean([u.factors[name].a for u in updates], weights)                # (r, n)
            b_bar = weighted_mean([u.factors[name].b_tilde() for u in updates], weights) / scale  # (m, r)
            u, v = ideal_update([(up.weight, up.factors[name]) for up in updates])              # ΔW* = u v
            prob = FairProblem(u, v, a_bar, b_bar, scale)
            db = np.zeros_like(b_bar)
            cos0 = prob.cos(db)
            trace = float(np.trace(prob.gram))
            # adam needs B̄Ā ≠ 0 (cos and its gradient undefined at 0); ls needs Ā ≠ 0; both need ΔW* ≠ 0
            start_norm2 = float(np.sum((b_bar.T @ b_bar) * prob.gram))        # ‖B̄Ā‖_F²
            solvable = prob.star_norm > 0 and (start_norm2 > 0 if p.solver == "adam" else trace > 0)
            if solvable:
                if p.solver == "adam":
                    rms = float(np.sqrt(np.mean(b_bar ** 2)))
                    db = prob.solve_adam(p.lam, p.steps, p.lr_factor * rms)
                else:
                    eps = p.eps * trace / a_bar.shape[0]
                    db = prob.solve_ls(eps + (p.mu if p.solver == "ls_ridge" else 0.0))
                before.append(cos0)
                after.append(prob.cos(db))
                b_norm = float(np.linalg.norm(b_bar))
                rel.append(float(np.linalg.norm(db)) / b_norm if b_norm > 0 else float("nan"))
            else:
                skipped += 1
            new[name] = LoRAFactors(a=a_bar.astype(g.a.dtype), b=(b_bar + db).astype(g.b.dtype), scale=scale)
        self.global_factors = new
        mean = (lambda xs: float(np.mean(xs)) if xs else float("nan"))
        return AggregateResult(stats={"cos_before": mean(before), "cos_after": mean(after),
                                      "delta_b_rel": mean(rel), "modules_skipped": float(skipped)})
