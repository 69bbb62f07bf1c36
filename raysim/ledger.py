"""What crosses the wire, in scalars (docs/algorithms.md, "Communication accounting").

`download_numel` and `upload_numel` are queries: asking twice costs the same. The coordinator then
records the round's downloads with `mark_synced`: the sampled clients hold the newest base version and
every one-off item (`ClientPlan.once`, e.g. a shared seed) of the plans just priced for them, which are
never charged to them again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.aggregators.base import ClientPlan
from raysim.base_log import BaseDeltaLog


class CommLedger:
    def __init__(self, num_clients: int, module_shapes: dict[str, tuple[int, int]], head_numel: int):
        self.module_shapes = module_shapes
        self.head_numel = head_numel                      # head scalars each way per client (0: not sent)
        self.last_sync = {c: 0 for c in range(num_clients)}   # base version each client holds
        self.received: dict[int, set[str]] = {}           # one-off items each client already holds
        self._priced: dict[int, set[str]] = {}            # one-off items of the plans priced, not yet sent

    def download_numel(self, client_id: int, plan: ClientPlan, log: BaseDeltaLog) -> int:
        """Factors sent + head + one-off items the client lacks + the base changes it missed since it last trained."""
        factors = sum(f.numel(tuple(plan.download)) for f in plan.start.values())
        new = {item: n for item, n in plan.once.items() if item not in self.received.get(client_id, ())}
        self._priced[client_id] = set(new)
        return (factors + self.head_numel + sum(new.values())
                + log.catch_up_numel(self.last_sync[client_id], self.module_shapes))

    def mark_synced(self, client_ids: list[int], version: int) -> None:
        """The clients received their downloads: base `version` and the one-off items last priced for them."""
        for cid in client_ids:
            self.last_sync[cid] = version
            self.received.setdefault(cid, set()).update(self._priced.pop(cid, set()))

    def upload_numel(self, plan: ClientPlan, hook_output: np.ndarray | None) -> int:
        """Uploaded factors + head + what the aggregator's client hook produced (e.g. a label histogram)."""
        extra = 0 if hook_output is None else int(np.size(hook_output))
        return sum(f.numel(tuple(plan.upload)) for f in plan.start.values()) + self.head_numel + extra

    def state_dict(self) -> dict[str, Any]:
        return {"last_sync": {str(k): v for k, v in self.last_sync.items()},
                "received": {str(k): sorted(v) for k, v in self.received.items() if v}}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        """Also reads checkpoints written before one-off items were tracked (client id -> version only)."""
        if "last_sync" not in meta:
            meta = {"last_sync": meta, "received": {}}
        self.last_sync = {int(k): int(v) for k, v in meta["last_sync"].items()}
        self.received = {int(k): set(v) for k, v in meta["received"].items()}
        self._priced = {}
