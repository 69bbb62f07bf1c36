"""HetLoRA: zero-padding to r_max, weighted aggregation, truncation back to each rank (arXiv 2401.06432)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np
from pydantic import Field

from raysim.aggregators.base import AggregateResult, ClientUpdate, register
from raysim.aggregators.padding import PaddingParams, SlotPadding
from raysim.lora.factors import Factors, LoRAFactors, grams, product_fro_norm, sandwich_norms


class HetLoRAParams(PaddingParams):
    weights: Literal["samples", "sparsity"] = Field(
        "samples", description="'samples': w_k = p_k (federation.weighting); 'sparsity': the paper's "
                               "w_k = ‖B̃_k A_k‖_F / Σ_j ‖B̃_j A_j‖_F, per module")
    prune: bool = Field(False, description="self-pruning (◆ rule, docs/algorithms.md, HetLoRA); off by default")
    prune_gamma: float = Field(0.9, gt=0, lt=1, description="candidate rank r' = floor(gamma·r_k)")
    prune_tol: float = Field(0.05, ge=0, lt=1, description="prune if ‖tail slots' product‖ ≤ tol·‖B̃_k A_k‖")
    min_rank: int = Field(1, ge=1, description="self-pruning never goes below this rank")


def sparsity_weights(factors: list[LoRAFactors], fallback: list[float]) -> np.ndarray:
    """w_k = ‖B̃_k A_k‖_F / Σ_j ‖B̃_j A_j‖_F (r×r Gram forms, no m×n product); `fallback` if all are 0."""
    norms = np.zeros(len(factors))
    for rank in {f.rank for f in factors}:
        idx = [k for k, f in enumerate(factors) if f.rank == rank]
        gb = grams([factors[k].b_tilde() for k in idx], "left")
        norms[idx] = sandwich_norms(gb, grams([factors[k].a for k in idx], "right"))
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


@register("hetlora")
class HetLoRA(SlotPadding):
    """HetLoRA: zero-pad every client to r_max, weighted sum (p_k or sparsity weights), truncate to r_k.

    A_g[j] = Σ_{k: r_k > j} w_k A_k[j] and B̃_g[:, j] likewise, so slot j carries only the owners' share
    π_j = Σ_{k: r_k > j} w_k (dilution of the high slots when few clients own them). Client k starts
    from the first r_k slots of the global. ◆ Slots no participant owns this round keep their value
    (`empty_slots: zero` gives the literal formula). Optional ◆ self-pruning (`prune: true`): after a
    round, client k moves to ⌊γ·r_k⌋ if its tail slots hold ≤ tol of ‖B̃_k A_k‖_F; the new rank is
    used from its next round on and persisted in the server state. Equal ranks with p_k: FedIT.
    """

    Params = HetLoRAParams
    global_state = SlotPadding.global_state + ("rank_total",)
    client_state = ("pruned_ranks",)        # self-pruning lowers a client's rank for later rounds
    pruned_ranks: dict[int, int]            # client id -> its pruned rank (only clients that were pruned)
    rank_total: int                         # Σ of every client's current rank (for mean_client_rank)

    @property
    def client_ranks(self) -> Mapping[int, int]:
        """Each client's current rank: its pruned rank if it has one, else the one it was set up with."""
        return CurrentRanks(self._assigned_ranks, self.pruned_ranks)

    @client_ranks.setter
    def client_ranks(self, ranks: dict[int, int]) -> None:
        self._assigned_ranks = ranks
        self.rank_total = int(sum(ranks.values()))

    def client_weights(self, updates: list[ClientUpdate]) -> dict[str, np.ndarray] | list[float]:
        p = [u.weight for u in updates]
        if self.params.weights == "samples":
            return p
        return {name: sparsity_weights([u.factors[name] for u in updates], p) for name in self.global_factors}

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        result = super().aggregate(rnd, updates)
        if self.params.prune:
            result.stats["pruned"] = float(self._prune(updates))
            result.stats["mean_client_rank"] = float(self.rank_total / len(self._assigned_ranks))
        return result

    def _prune(self, updates: list[ClientUpdate]) -> int:
        p = self.params
        pruned = 0
        ranks = self.client_ranks
        for u in updates:
            rank = ranks[u.client_id]
            new = pruned_rank(u.factors, min(rank, next(iter(u.factors.values())).rank),
                              p.prune_gamma, p.prune_tol, p.min_rank)
            if new < rank:
                self.pruned_ranks[u.client_id] = new
                self.rank_total += new - rank
                pruned += 1
        return pruned


class CurrentRanks(Mapping):
    """Client id -> current rank: the pruned rank where there is one, else the assigned one (read-only)."""

    def __init__(self, assigned: dict[int, int], pruned: Mapping[int, int]):
        self.assigned = assigned
        self.pruned = pruned

    def __getitem__(self, client_id: int) -> int:
        rank = self.pruned.get(client_id)
        return self.assigned[client_id] if rank is None else rank

    def __iter__(self) -> Iterator[int]:
        return iter(self.assigned)

    def __len__(self) -> int:
        return len(self.assigned)
