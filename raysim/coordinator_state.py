"""The coordinator's checkpoint state: every server-side owner's state (the aggregator's declared global and
per-client state, the heads, the base-delta log, the communication ledger, the clients' ranks) as one dict of
named arrays plus JSON metadata, and back. Checkpoint files: `raysim.checkpoint`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

# `c` below is a raysim.coordinator.CoordinatorImpl (not imported: that module imports this one)


def coordinator_state(c: Any, rnd: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, meta) of the server after round `rnd`; each owner's arrays under its own prefix."""
    agg_tensors, agg_meta = c.aggregator.state_dict()
    head_tensors, head_meta = c.heads.state_dict()
    base_tensors, base_meta = c.base_log.state_dict()
    ledger_tensors, ledger_meta = c.ledger.state_dict()
    tensors = {f"agg/{k}": np.ascontiguousarray(v) for k, v in agg_tensors.items()}
    tensors.update(head_tensors)
    tensors.update({f"base/{k}": v for k, v in base_tensors.items()})
    tensors.update({f"ledger/{k}": v for k, v in ledger_tensors.items()})
    tensors["ranks"] = np.array([c.ranks[k] for k in range(c.cfg.federation.num_clients)], np.int32)
    meta = {"round": rnd, "aggregator": agg_meta, **head_meta, "base_versions": base_meta,
            "last_sync": ledger_meta, "wall_s": c.elapsed_before + (time.time() - c.started)}
    return tensors, meta


def restore_coordinator(c: Any, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
    """Load `coordinator_state`'s output into the coordinator; returns the round it was taken after."""
    if "ranks" in tensors:                    # before the aggregator's own state (HetLoRA's rank_total wins)
        c.ranks = {k: int(r) for k, r in enumerate(tensors["ranks"])}
        c.aggregator.client_ranks = dict(c.ranks)
    c.aggregator.load_state_dict(_part(tensors, "agg/"), meta["aggregator"])
    c.heads.load_state_dict(tensors, meta)
    c.base_log.load_state_dict(_part(tensors, "base/"), meta["base_versions"])
    c.ledger.load_state_dict(_part(tensors, "ledger/"), meta["last_sync"])
    c.elapsed_before = float(meta["wall_s"])
    c.started = time.time()
    return int(meta["round"])


def _part(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
