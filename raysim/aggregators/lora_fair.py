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
        val, grad = FairStack([self]).value_and_grad(db[None], lam)
        return float(val[0]), grad[0]

    def solve_adam(self, lam: float, steps: int, lr: float) -> np.ndarray:
        """Adam from ΔB = 0; returns the best iterate seen (ΔB = 0 included)."""
        return FairStack([self]).solve_adam(lam, steps, np.array([lr]))[0]

    def solve_ls(self, ridge: float) -> np.ndarray:
        """ΔB = (ΔW*/s − B̄Ā)Āᵀ(G + ridge·I)⁻¹ = (c/s − B̄G)(G + ridge·I)⁻¹ (zero when ΔW* = sB̄Ā)."""
        rhs = self.c / self.scale - self.b_bar @ self.gram                   # (m, r)
        lhs = self.gram + ridge * np.eye(self.gram.shape[0])                 # symmetric (r, r)
        return np.linalg.solve(lhs, rhs.T).T


class FairStack:
    """Problems of modules of one shape (m, r), stacked on a leading axis: one vectorised Adam for all."""

    def __init__(self, problems: list[FairProblem]):
        self.scale = np.array([p.scale for p in problems], dtype=np.float64)[:, None, None]
        self.b_bar = np.stack([p.b_bar for p in problems])                       # (M, m, r)
        self.gram = np.stack([p.gram for p in problems])                         # (M, r, r)
        self.c = np.stack([p.c for p in problems])                               # (M, m, r)
        self.star_norm = np.array([p.star_norm for p in problems])               # (M,)

    def value_and_grad(self, db: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """f and ∂f/∂ΔB of every module; db (M, m, r)."""
        bp = self.b_bar + db
        bp *= self.scale                                                         # B′
        bg = bp @ self.gram                                                      # B′G
        inner = np.einsum("kij,kij->k", self.c, bp)                              # ⟨ΔW*, B′Ā⟩
        y = np.sqrt(np.maximum(np.einsum("kij,kij->k", bp, bg), 1e-300))        # ‖B′Ā‖_F
        xy = self.star_norm * y
        bg *= (inner / (xy * y * y))[:, None, None]
        grad = self.c * (1.0 / xy)[:, None, None]
        grad -= bg
        grad *= -self.scale                                                      # ∂(1 − cos)/∂ΔB
        norm = np.sqrt(np.einsum("kij,kij->k", db, db))
        if lam and norm.any():                                                   # + λ ΔB/‖ΔB‖ where ΔB ≠ 0
            grad += (lam / np.where(norm > 0, norm, np.inf))[:, None, None] * db
        return 1.0 - inner / xy + lam * norm, grad

    def solve_adam(self, lam: float, steps: int, lr: np.ndarray) -> np.ndarray:
        """Adam from ΔB = 0 for every module (learning rates lr (M,)); the best iterate seen per module."""
        beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
        lr = np.asarray(lr, dtype=np.float64)[:, None, None]
        db = np.zeros_like(self.b_bar)
        m1 = np.zeros_like(db)
        m2 = np.zeros_like(db)
        best_val, grad = self.value_and_grad(db, lam)
        best = db.copy()
        step = np.empty_like(db)
        for t in range(1, steps + 1):
            m1 *= beta1
            m1 += (1 - beta1) * grad
            m2 *= beta2
            m2 += (1 - beta2) * (grad * grad)
            np.sqrt(m2 / (1 - beta2 ** t), out=step)
            step += adam_eps
            np.divide(m1 / (1 - beta1 ** t), step, out=step)
            step *= lr
            db = db - step
            val, grad = self.value_and_grad(db, lam)
            better = val < best_val
            if better.any():
                best_val = np.where(better, val, best_val)
                best[better] = db[better]
        return best


@register("lora_fair")
class LoRAFair(Aggregator):
    """LoRA-FAIR: FedAvg, then B_g = B̄ + ΔB with ΔB maximising cos(ΔW*, s(B̄+ΔB)Ā) − λ‖ΔB‖, per module.

    Each module is corrected independently, all terms in factored form (docs/algorithms.md, LoRA-FAIR);
    A_g = Ā. Solvers: `adam` (float64 Adam with analytic gradients, lr = lr_factor·RMS(B̄), best iterate kept,
    ΔB = 0 included, so the objective never rises), `ls` (ΔB = (ΔW*/s − B̄Ā)Āᵀ(ĀĀᵀ+εI)⁻¹, which at ε → 0
    attains the largest cosine among matrices with rows in Ā's row space, ΔW*·Π_Ā) and `ls_ridge` (the
    same with ĀĀᵀ + (μ+ε)I). Modules with ΔW* = 0 (for adam also B̄Ā = 0, for ls Ā = 0) are skipped
    (ΔB = 0). Stats: mean over modules of cos before/after and of ‖ΔB‖_F/‖B̄‖_F, the number of skipped
    modules, and the number of solved modules that kept ΔB = 0 (with `adam` when no iterate lowers the
    objective, e.g. when ‖∂(1 − cos)/∂ΔB‖ at 0 is below λ). Not exact; equal ranks only.
    """

    exact = False
    uploads = "A_k (r×n), B_k (m×r)"
    broadcasts = "Ā, B̄ + ΔB"
    comm_per_module = "up r(m+n), down r(m+n)"
    Params = LoRAFairParams

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        updates = sorted(updates, key=lambda u: u.client_id)      # order-independent round-off
        weights = [u.weight for u in updates]
        problems, buffers = {}, {}
        for name, g in self.global_factors.items():
            scale = float(g.scale)
            a_bar = weighted_mean([u.factors[name].a for u in updates], weights)                # (r, n)
            b_bar = weighted_mean([u.factors[name].b_tilde() for u in updates], weights) / scale  # (m, r)
            u, v = ideal_update([(up.weight, up.factors[name]) for up in updates], buffers)     # ΔW* = u v
            problems[name] = (FairProblem(u, v, a_bar, b_bar, scale), a_bar)
        corrections = self._solve({name: prob for name, (prob, _) in problems.items()})
        new, before, after, rel = {}, [], [], []
        kept_zero = 0
        for name, g in self.global_factors.items():
            prob, a_bar = problems[name]
            db = corrections.get(name)
            if db is not None:
                kept_zero += int(not db.any())        # adam: no iterate beat ΔB = 0 (e.g. λ above the gradient)
                before.append(prob.cos(np.zeros_like(db)))
                after.append(prob.cos(db))
                b_norm = float(np.linalg.norm(prob.b_bar))
                rel.append(float(np.linalg.norm(db)) / b_norm if b_norm > 0 else float("nan"))
            b = prob.b_bar if db is None else prob.b_bar + db
            new[name] = LoRAFactors(a=a_bar.astype(g.a.dtype), b=b.astype(g.b.dtype), scale=prob.scale)
        self.global_factors = new
        mean = (lambda xs: float(np.mean(xs)) if xs else float("nan"))
        return AggregateResult(stats={"cos_before": mean(before), "cos_after": mean(after),
                                      "delta_b_rel": mean(rel), "modules_skipped": float(len(new) - len(corrections)),
                                      "modules_delta_b_zero": float(kept_zero)})

    def _solve(self, problems: dict[str, FairProblem]) -> dict[str, np.ndarray]:
        """ΔB of every solvable module (the others are skipped); Adam runs once for all modules of a shape."""
        p = self.params
        out, groups = {}, {}
        for name, prob in problems.items():
            trace = float(np.trace(prob.gram))
            # adam needs B̄Ā ≠ 0 (cos and its gradient undefined at 0); ls needs Ā ≠ 0; both need ΔW* ≠ 0
            start_norm2 = float(np.sum((prob.b_bar.T @ prob.b_bar) * prob.gram))        # ‖B̄Ā‖_F²
            if not (prob.star_norm > 0 and (start_norm2 > 0 if p.solver == "adam" else trace > 0)):
                continue
            if p.solver == "adam":
                groups.setdefault(prob.b_bar.shape, []).append(name)
            else:
                eps = p.eps * trace / prob.gram.shape[0]
                out[name] = prob.solve_ls(eps + (p.mu if p.solver == "ls_ridge" else 0.0))
        for names in groups.values():
            lrs = np.array([p.lr_factor * float(np.sqrt(np.mean(problems[n].b_bar ** 2))) for n in names])
            best = FairStack([problems[n] for n in names]).solve_adam(p.lam, p.steps, lrs)
            out.update(zip(names, best))
        return out
