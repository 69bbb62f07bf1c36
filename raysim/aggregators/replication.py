"""Replication-based padding: slot-wise renormalised averaging (Byun & Lee, arXiv 2406.17477)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from raysim.aggregators.base import register
from raysim.aggregators.hetlora import HetLoRA


class ReplicationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    empty_slots: Literal["keep", "zero"] = Field(
        "keep", description="slots no participant owns this round keep their value (the default) or become 0")


@register("replication")
class Replication(HetLoRA):
    """Replication-based padding: slot j is the p-weighted mean of the clients that own it (no dilution).

    A_g[j] = Σ_{k: r_k > j} p_k A_k[j] / π_j and B̃_g[:, j] likewise, π_j = Σ_{k: r_k > j} p_k: what
    padding each low-rank client with the owners' mean of the missing slots and then averaging gives
    (ALGORITHMS.md §2.8, raysim's formalisation). Slots with π_j = 0 keep their previous value. Clients
    start from the first r_k slots of the global. Agrees with zero-padding on the slots every client
    owns; equal ranks give FedIT.
    """

    exact = False
    mixed_ranks = True
    uploads = "A_k (r_k×n), B_k (m×r_k)"
    broadcasts = "A_g[:r_k], B_g[:, :r_k] (truncation to the client's rank)"
    comm_per_module = "up r_k(m+n), down r_k(m+n)"
    Params = ReplicationParams
    renormalise = True
