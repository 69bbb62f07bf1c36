"""Slot-wise averaging for clients of different ranks: the arithmetic, and the aggregator base that
HetLoRA and replication padding share (docs/algorithms.md, HetLoRA and Replication padding).

A rank slot j is the pair (row A[j, :], column B̃[:, j]). A client of rank r_k owns slots 0 … r_k−1.
With weights w_k (Σ w_k = 1 over this round's clients) and H_j = {k : r_k > j}:

    zero-padded sums   S_A[j] = Σ_{k∈H_j} w_k A_k[j],   S_B̃[:, j] = Σ_{k∈H_j} w_k B̃_k[:, j]
    owners' share      π_j    = Σ_{k∈H_j} w_k  ≤ 1

Zero-padding (HetLoRA, and FedIT/FedEx with mixed ranks) uses the sums as they are: the padding zeros
of low-rank clients count as votes for 0, so slot j is scaled by π_j ("dilution"). Replication-based
padding divides by π_j (the owners' weighted mean). In both, ◆ a slot with π_j = 0 (no participant
owns it this round) keeps its previous value, and `empty_slots="zero"` sets it to 0 instead; a slot
whose A-row and B-column are both 0 can never train again (both gradients vanish), so "keep" is the default.
No Ray, no torch; float64 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from raysim.aggregators.base import AggregateResult, Aggregator, ClientUpdate, MethodParams
from raysim.lora.factors import Factors, LoRAFactors


@dataclass
class SlotSums:
    """Zero-padded weighted sums of one module over `rank` slots (float64)."""

    a: np.ndarray        # (rank, n)  Σ_{k∈H_j} w_k A_k[j]
    bt: np.ndarray       # (m, rank)  Σ_{k∈H_j} w_k B̃_k[:, j]
    pi: np.ndarray       # (rank,)    Σ_{k∈H_j} w_k
    owners: np.ndarray   # (rank,)    |H_j|
    clients: int         # K


def slot_sums(factors: list[LoRAFactors], weights: list[float] | np.ndarray, rank: int) -> SlotSums:
    """Zero-padded weighted sums of client factors (each of rank r_k ≤ rank) over `rank` slots.

    With equal ranks this performs exactly the operations of `weighted_mean` (bitwise the same sums).
    """
    m, n = factors[0].shape
    a = np.zeros((rank, n), dtype=np.float64)
    bt = np.zeros((m, rank), dtype=np.float64)
    pi = np.zeros(rank, dtype=np.float64)
    owners = np.zeros(rank, dtype=np.int64)
    for w, f in zip(weights, factors):
        r = f.rank
        if r > rank:
            raise ValueError(f"a client of rank {r} does not fit a global adapter of rank {rank}")
        a[:r] += w * f.a.astype(np.float64)
        bt[:, :r] += w * f.b_tilde().astype(np.float64)
        pi[:r] += w
        owners[:r] += 1
    return SlotSums(a=a, bt=bt, pi=pi, owners=owners, clients=len(factors))


def combine(sums: SlotSums, previous: LoRAFactors | None, scale: float, renormalise: bool,
            empty_slots: str = "keep") -> LoRAFactors:
    """Global factors of one module (scale `scale`, float64) from the slot sums.

    renormalise=False: zero-padding (slot j carries π_j). renormalise=True: replication, slot j is
    divided by π_j; slots every participant owns are left as they are (π_j = Σ w_k = 1), so equal
    ranks give bitwise the zero-padded (FedIT) result. Slots with π_j = 0 keep `previous`'s value
    (`empty_slots="keep"`, needs `previous`) or become 0 (`"zero"`).
    """
    a, bt = sums.a.copy(), sums.bt.copy()
    if renormalise:
        partial = (sums.owners > 0) & (sums.owners < sums.clients) & (sums.pi > 0)
        a[partial] /= sums.pi[partial, None]
        bt[:, partial] /= sums.pi[partial]
    empty = ~(sums.pi > 0)
    if empty.any() and empty_slots == "keep" and previous is not None:
        prev_bt = previous.b_tilde().astype(np.float64)
        a[empty] = previous.a[empty].astype(np.float64)
        bt[:, empty] = prev_bt[:, empty]
    return LoRAFactors(a=a, b=bt / scale, scale=scale)


def padded_average(factors_by_module: dict[str, list[LoRAFactors]], weights: dict[str, np.ndarray] | list[float],
                   previous: Factors, scale: float, renormalise: bool = False,
                   empty_slots: str = "keep") -> tuple[Factors, dict[str, np.ndarray]]:
    """(global factors at the rank of `previous`, π per module) for every module.

    factors_by_module[module] = client factors in one order; weights: one list for all modules, or
    a dict module -> weights (HetLoRA's per-module sparsity weights).
    """
    out, pis = {}, {}
    for name, fs in factors_by_module.items():
        w = weights[name] if isinstance(weights, dict) else weights
        prev = previous[name]
        sums = slot_sums(fs, w, prev.rank)
        out[name] = combine(sums, prev, scale, renormalise, empty_slots)
        pis[name] = sums.pi
    return out, pis


def zero_padded_mean(updates: list[ClientUpdate], previous: Factors, scale: float) -> Factors:
    """FedIT with mixed ranks: p-weighted zero-padded average at the global rank, float64.

    Equal ranks: bitwise the plain average Σ p_k A_k, (Σ p_k B̃_k) / scale.
    """
    by_module = {name: [u.factors[name] for u in updates] for name in updates[0].factors}
    return padded_average(by_module, [u.weight for u in updates], previous, scale)[0]


def slot_stats(pis: dict[str, np.ndarray], updates: list[ClientUpdate], r_max: int) -> dict[str, float]:
    """Dilution diagnostics: π of the first and last slot (mean over modules) and owners of the last slot."""
    last = np.mean([pi[-1] for pi in pis.values()])
    first = np.mean([pi[0] for pi in pis.values()])
    owners = sum(1 for u in updates if next(iter(u.factors.values())).rank >= r_max)
    return {"pi_first_slot": float(first), "pi_last_slot": float(last), "owners_last_slot": float(owners)}


class PaddingParams(MethodParams):
    empty_slots: Literal["keep", "zero"] = Field(
        "keep", description="slots no participant owns this round: keep their value (◆ default) or set 0")


class SlotPadding(Aggregator):
    """Slot-wise weighted average at the global rank (r_max); each client starts from its first r_k slots.

    The shared base of HetLoRA (zero-padding, `renormalise = False`) and replication padding
    (`renormalise = True`); subclasses may also choose other client weights (`client_weights`).
    """

    exact = False
    mixed_ranks = True
    uploads = "A_k (r_k×n), B_k (m×r_k)"
    broadcasts = "A_g[:r_k], B_g[:, :r_k] (truncation to the client's rank)"
    comm_per_module = "up r_k(m+n), down r_k(m+n)"
    Params = PaddingParams
    renormalise: ClassVar[bool] = False

    def client_weights(self, updates: list[ClientUpdate]) -> dict[str, np.ndarray] | list[float]:
        """w_k: one list for all modules or a dict module -> weights. Default: p_k."""
        return [u.weight for u in updates]

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> AggregateResult:
        g0 = next(iter(self.global_factors.values()))
        scale, dtype, r_max = g0.scale, g0.a.dtype, g0.rank
        by_module = {name: [u.factors[name] for u in updates] for name in self.global_factors}
        new, pis = padded_average(by_module, self.client_weights(updates), self.global_factors, scale,
                                  renormalise=self.renormalise, empty_slots=self.params.empty_slots)
        self.global_factors = {k: LoRAFactors(a=f.a.astype(dtype), b=f.b.astype(dtype), scale=f.scale)
                               for k, f in new.items()}
        return AggregateResult(stats=slot_stats(pis, updates, r_max))
