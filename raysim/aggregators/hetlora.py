"""HetLoRA: zero-padding to r_max, weighted aggregation, truncation back to each rank (arXiv 2401.06432)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysim.aggregators.base import AggregateResult, Aggregator, ClientUpdate, register
from raysim.aggregators.padding import padded_average
from raysim.lora.factors import Factors, LoRAFactors, product_fro_norm


class HetLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: Literal["samples", "sparsity"] = Field(
        "samples", description="'samples': w_k = p_k (federation.weighting); 'sparsity': the paper's "
                               "w_k = ‖B̃_k A_k‖_F / Σ_j ‖B̃_j A_j‖_F, per module")
    empty_slots: Literal["keep", "zero"] = Field(
        "keep", description="slots no participant owns this round: keep their value (◆ default) or set 0")
    prune: bool = Field(False, description="self-pruning (◆ rule of ALGORITHMS.md §2.7); off by default")
    prune_gamma: float = Field(0.9, gt=0, lt=1, description="candidate rank r' = floor(gamma·r_k)")
    prune_tol: float = Field(0.05, ge=0, lt=1, description="prune if ‖tail slots' product‖ ≤ tol·‖B̃_k A_k‖")
    min_rank: int = Field(1, ge=1, description="self-pruning never goes below this rank")


def sparsity_weights(factors: list[LoRAFactors], fallback: list[float]) -> np.ndarray:
    """w_k = ‖B̃_k A_k‖_F / Σ_j ‖B̃_j A_j‖_F (norms without forming m×n, §1.6); `fallback` if all are 0."""
    norms = np.array([product_fro_norm(f.b_tilde(), f.a) for f in factors], dtype=np.float64)
    total = norms.sum()
    if not total > 0:
        return np.asarray(fallback, dtype=np.float64)
    return norms / total


def pruned_rank(factors: Factors, rank: int, gamma: float, tol: float, min_rank: int) -> int:
    """◆ Self-pruning: r' = ⌊γ·r⌋ if ‖B̃[:, r':r]·A[r':r]‖_F ≤ tol·‖B̃·A‖_F over all modules, else r."""
    r_new = int(np.floor(gamma * rank))
    if r_new < min_rank or r_new >= rank:
        return rank
    tail2 = total2 = 0.0
    for f in factors.values():
        bt = f.b_tilde()
        tail2 += product_fro_norm(bt[:, r_new:rank], f.a[r_new:rank]) ** 2
        total2 += product_fro_norm(bt[:, :rank], f.a[:rank]) ** 2
    return r_new if total2 > 0 and np.sqrt(tail2) <= tol * np.sqrt(total2) else rank


def slot_stats(pis: dict[str, np.ndarray], updates: list[ClientUpdate], r_max: int) -> dict[str, float]:
    """Dilution diagnostics: π of the first and last slot (mean over modules) and owners of the last slot."""
    last = np.mean([pi[-1] for pi in pis.values()])
    first = np.mean([pi[0] for pi in pis.values()])
    owners = sum(1 for u in updates if next(iter(u.factors.values())).rank >= r_max)
    return {"pi_first_slot": float(first), "pi_last_slot": float(last), "owners_last_slot": float(owners)}


@register("hetlora")
class HetLoRA(Aggregator):
    """HetLoRA: zero-pad every client to r_max, weighted sum (p_k or sparsity weights), truncate to r_k.

    A_g[j] = Σ_{k: r_k > j} w_k A_k[j] and B̃_g[:, j] likewise, so slot j carries only the owners' share
    π_j = Σ_{k: r_k > j} w_k (dilution of the high slots when few clients own them). Client k starts
    from the first r_k slots of the global. ◆ Slots no participant owns this round keep their value
    (`empty_slots: zero` gives the literal formula). Optional ◆ self-pruning (`prune: true`): after a
    round, client k moves to ⌊γ·r_k⌋ if its tail slots hold ≤ tol of ‖B̃_k A_k‖_F; the new rank is
    used from its next round on and persisted in the server state. Equal ranks with p_k: FedIT.
    """

    exact = False
    mixed_ranks = True
    uploads = "A_k (r_k×n), B_k (m×r_k)"
    broadcasts = "A_g[:r_k], B_g[:, :r_k] (truncation to the client's rank)"
    comm_per_module = "up r_k(m+n), down r_k(m+n)"
    Params = HetLoRAParams
    renormalise = False

    def _weights(self, updates: list[ClientUpdate]) -> dict[str, np.ndarray] | list[float]:
        p = [u.weight for u in updates]
        if getattr(self.params, "weights", "samples") == "samples":
            return p
        return {name: sparsity_weights([u.factors[name] for u in updates], p) for name in self.global_factors}

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        g0 = next(iter(self.global_factors.values()))
        scale, dtype, r_max = g0.scale, g0.a.dtype, g0.rank
        by_module = {name: [u.factors[name] for u in updates] for name in self.global_factors}
        new, pis = padded_average(by_module, self._weights(updates), self.global_factors, scale,
                                  renormalise=self.renormalise,
                                  empty_slots=getattr(self.params, "empty_slots", "keep"))
        self.global_factors = {k: LoRAFactors(a=f.a.astype(dtype), b=f.b.astype(dtype), scale=f.scale)
                               for k, f in new.items()}
        stats = slot_stats(pis, updates, r_max)
        if getattr(self.params, "prune", False):
            stats["pruned"] = float(self._prune(updates))
            stats["mean_client_rank"] = float(np.mean(list(self.client_ranks.values())))
        return AggregateResult(stats=stats)

    def _prune(self, updates: list[ClientUpdate]) -> int:
        p = self.params
        pruned = 0
        for u in updates:
            rank = self.client_ranks[u.client_id]
            new = pruned_rank(u.factors, min(rank, next(iter(u.factors.values())).rank),
                              p.prune_gamma, p.prune_tol, p.min_rank)
            if new < rank:
                self.client_ranks[u.client_id] = new
                pruned += 1
        return pruned

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, meta = super().state_dict()
        meta["client_ranks"] = {str(c): int(r) for c, r in self.client_ranks.items()}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        if "client_ranks" in meta:
            self.client_ranks = {int(c): int(r) for c, r in meta["client_ranks"].items()}
