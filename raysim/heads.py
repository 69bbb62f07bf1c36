"""The classifier head of the global model and, with `lora.head_policy: local`, each client's own head.

fedavg: every client starts from the global head; the new global head is the p-weighted mean of the
clients' heads, and it travels both ways. local: a client starts from its own last head (the initial
head before it first trains); the average is kept only to evaluate (and export) the global adapter,
and nothing travels. With `lora.train_head: false` the head never changes. The clients' own heads are a
dict in memory, or live in a `raysim.client_store.ClientStore` when one is given (files on the run's
storage, a small cache in memory; a checkpoint then lists the store's files instead of holding the heads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from raysim.aggregators.base import weighted_mean

if TYPE_CHECKING:
    from raysim.client_store import ClientStore

Head = dict[str, np.ndarray]


class HeadState:
    def __init__(self, initial: Head, policy: str, trained: bool, store: "ClientStore | None" = None):
        self.initial = {k: v.copy() for k, v in initial.items()}
        self.global_head = {k: v.copy() for k, v in initial.items()}
        self.store = store
        self.client_heads: Mapping[int, Head] = {} if store is None else store.view("head")
        self.local = policy == "local"
        self.trained = trained

    def start_for(self, client_id: int) -> Head:
        """What the client's head starts from this round."""
        if self.local:
            own = self.client_heads.get(client_id)
            return self.initial if own is None else own
        return self.global_head

    def numel_on_wire(self) -> int:
        """Head scalars each way per client: the whole head under fedavg, none when frozen or local."""
        return sum(v.size for v in self.global_head.values()) if self.trained and not self.local else 0

    def update(self, heads: dict[int, Head], weights: dict[int, float]) -> None:
        """Fold in the heads of this round's completed clients (client id -> head), weights p_k."""
        if not self.trained or not heads:
            return
        ids = list(heads)
        self.global_head = {k: weighted_mean([heads[c][k] for c in ids], [weights[c] for c in ids]).astype(np.float32)
                            for k in self.global_head}
        if self.local:
            for cid, head in heads.items():
                self.client_heads[cid] = head

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(tensors, metadata). The clients' heads are tensors `client_head/<id>/<name>`, or, with a store,
        written to its files and listed under "client_store"."""
        tensors = {f"head/{k}": v for k, v in self.global_head.items()}
        if self.store is not None:
            return tensors, {"head": sorted(self.global_head), "client_store": self.store.state_dict()}
        tensors.update({f"client_head/{cid}/{k}": v for cid, h in self.client_heads.items() for k, v in h.items()})
        return tensors, {"head": sorted(self.global_head), "client_heads": sorted(self.client_heads)}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.global_head = {k: np.array(tensors[f"head/{k}"]) for k in meta["head"]}
        if "client_store" in meta:
            if self.store is None:
                raise ValueError("this checkpoint keeps the clients' heads in client-store files: give HeadState "
                                 "the run's store to load it")
            self.store.load_state_dict(meta["client_store"])
            return
        heads = {int(cid): {k: np.array(tensors[f"client_head/{cid}/{k}"]) for k in meta["head"]}
                 for cid in meta.get("client_heads", [])}
        if self.store is None:
            self.client_heads = heads
            return
        self.store.clear()
        self.client_heads.update(heads)
