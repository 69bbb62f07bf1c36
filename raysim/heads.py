"""The classifier head of the global model and, with `lora.head_policy: local`, each client's own head.

fedavg: every client starts from the global head; the new global head is the p-weighted mean of the
clients' heads, and it travels both ways. local: a client starts from its own last head (the initial
head before it first trains); the average is kept only to evaluate (and export) the global adapter,
and nothing travels. With `lora.train_head: false` the head never changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.aggregators.base import weighted_mean

Head = dict[str, np.ndarray]


class HeadState:
    def __init__(self, initial: Head, policy: str, trained: bool):
        self.initial = {k: v.copy() for k, v in initial.items()}
        self.global_head = {k: v.copy() for k, v in initial.items()}
        self.client_heads: dict[int, Head] = {}
        self.local = policy == "local"
        self.trained = trained

    def start_for(self, client_id: int) -> Head:
        """What the client's head starts from this round."""
        if self.local:
            return self.client_heads.get(client_id, self.initial)
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
            self.client_heads.update(heads)

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {f"head/{k}": v for k, v in self.global_head.items()}
        tensors.update({f"client_head/{cid}/{k}": v for cid, h in self.client_heads.items() for k, v in h.items()})
        return tensors, {"head": sorted(self.global_head), "client_heads": sorted(self.client_heads)}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.global_head = {k: np.array(tensors[f"head/{k}"]) for k in meta["head"]}
        self.client_heads = {int(cid): {k: np.array(tensors[f"client_head/{cid}/{k}"]) for k in meta["head"]}
                             for cid in meta.get("client_heads", [])}
