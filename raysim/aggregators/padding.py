"""Slot-wise arithmetic for clients of different ranks (ALGORITHMS.md §2.7 HetLoRA, §2.8 replication).

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

import numpy as np

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


def zero_padded_mean(updates, previous: Factors, scale: float) -> Factors:
    """FedIT with mixed ranks: p-weighted zero-padded average at the global rank, float64.

    updates: ClientUpdate list. Equal ranks: bitwise `raysim.aggregators.fedit.average_factors`.
    """
    by_module = {name: [u.factors[name] for u in updates] for name in updates[0].factors}
    return padded_average(by_module, [u.weight for u in updates], previous, scale)[0]

