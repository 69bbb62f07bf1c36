"""Replication-based padding: slot-wise renormalised averaging (Byun & Lee, arXiv 2406.17477)."""

from __future__ import annotations

from raysim.aggregators.base import register
from raysim.aggregators.padding import SlotPadding


@register("replication")
class Replication(SlotPadding):
    """Replication-based padding: slot j is the p-weighted mean of the clients that own it (no dilution).

    A_g[j] = Σ_{k: r_k > j} p_k A_k[j] / π_j and B̃_g[:, j] likewise, π_j = Σ_{k: r_k > j} p_k: what
    padding each low-rank client with the owners' mean of the missing slots and then averaging gives
    (raysim's formalisation, docs/algorithms.md, Replication padding). Slots with π_j = 0 keep their
    previous value (`empty_slots: zero` sets them to 0). Clients start from the first r_k slots of the
    global. Agrees with zero-padding (HetLoRA) on the slots every client owns; equal ranks give FedIT.
    """

    renormalise = True
