"""What crosses the wire, in scalars (docs/algorithms.md, "Communication accounting").

`download_numel` and `upload_numel` are queries: asking twice costs the same. The coordinator then
records the round's downloads with `mark_synced`: the sampled clients hold the newest base version and
every one-off item (`ClientPlan.once`, e.g. a shared seed) of the plans just priced for them, which are
never charged to them again.

Per client the ledger keeps a few bytes, whatever the number of clients: the base version it holds (one
int32 array) and, per one-off item, whether it holds it (one bool array per item). Pricing a client is
O(1) in the number of clients and base versions (`BaseDeltaLog.catch_up_numel`). Checkpoints store the
arrays as tensors.
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
        self.num_clients = num_clients
        self.last_sync = np.zeros(num_clients, dtype=np.int32)     # base version each client holds
        self.received: dict[str, np.ndarray] = {}         # one-off item -> which clients hold it (bool)
        self._priced: dict[int, list[str]] = {}           # one-off items of the plans priced, not yet sent

    def download_numel(self, client_id: int, plan: ClientPlan, log: BaseDeltaLog) -> int:
        """Factors sent + head + one-off items the client lacks + the base changes it missed since it last trained."""
        factors = sum(f.numel(tuple(plan.download)) for f in plan.start.values())
        new = {item: n for item, n in plan.once.items() if not self.holds(client_id, item)}
        self._priced[client_id] = list(new)
        return (factors + self.head_numel + sum(new.values())
                + log.catch_up_numel(int(self.last_sync[client_id]), self.module_shapes))

    def holds(self, client_id: int, item: str) -> bool:
        """Whether the client already received one-off item `item`."""
        return item in self.received and bool(self.received[item][client_id])

    def mark_synced(self, client_ids: list[int], version: int) -> None:
        """The clients received their downloads: base `version` and the one-off items last priced for them."""
        self.last_sync[np.asarray(client_ids, dtype=np.int64)] = version
        for cid in client_ids:
            for item in self._priced.pop(cid, ()):
                self.received.setdefault(item, np.zeros(self.num_clients, dtype=bool))[cid] = True

    def upload_numel(self, plan: ClientPlan, hook_output: np.ndarray | None) -> int:
        """Uploaded factors + head + what the aggregator's client hook produced (e.g. a label histogram)."""
        extra = 0 if hook_output is None else int(np.size(hook_output))
        return sum(f.numel(tuple(plan.upload)) for f in plan.start.values()) + self.head_numel + extra

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(tensors, metadata): `last_sync` and `received/<item>` arrays; the metadata names the items."""
        tensors = {"last_sync": self.last_sync} | {f"received/{item}": held for item, held in self.received.items()}
        return tensors, {"format": 2, "items": sorted(self.received)}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Also reads the earlier JSON-only checkpoints ({"last_sync": {id: version}, "received": {id: [item]}},
        or only client id -> version)."""
        self._priced = {}
        if meta.get("format") == 2:
            self.last_sync = np.array(tensors["last_sync"], dtype=np.int32)
            self.received = {item: np.array(tensors[f"received/{item}"], dtype=bool) for item in meta["items"]}
            return
        if "last_sync" not in meta:
            meta = {"last_sync": meta, "received": {}}
        self.last_sync = np.zeros(self.num_clients, dtype=np.int32)
        for cid, version in meta["last_sync"].items():
            self.last_sync[int(cid)] = int(version)
        self.received = {}
        for cid, items in meta["received"].items():
            for item in items:
                self.received.setdefault(item, np.zeros(self.num_clients, dtype=bool))[int(cid)] = True
