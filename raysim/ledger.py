"""What crosses the wire, in scalars (docs/algorithms.md, "Communication accounting").

Queries here have no side effects; the coordinator records who holds which base version with
`mark_synced` once the round's downloads are decided.
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

    def download_numel(self, client_id: int, plan: ClientPlan, log: BaseDeltaLog) -> int:
        """Factors sent + head + one-off extras + the base changes the client missed since it last trained."""
        factors = sum(f.numel(tuple(plan.download)) for f in plan.start.values())
        return (factors + self.head_numel + plan.extra_download
                + log.catch_up_numel(self.last_sync[client_id], self.module_shapes))

    def mark_synced(self, client_ids: list[int], version: int) -> None:
        for cid in client_ids:
            self.last_sync[cid] = version

    def upload_numel(self, plan: ClientPlan, hook_output: np.ndarray | None) -> int:
        """Uploaded factors + head + what the aggregator's client hook produced (e.g. a label histogram)."""
        extra = 0 if hook_output is None else int(np.size(hook_output))
        return sum(f.numel(tuple(plan.upload)) for f in plan.start.values()) + self.head_numel + extra

    def state_dict(self) -> dict[str, Any]:
        return {str(k): v for k, v in self.last_sync.items()}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        self.last_sync = {int(k): int(v) for k, v in meta.items()}
