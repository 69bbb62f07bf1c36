"""The log of changes to the frozen base weights (FedEx-LoRA residuals, FLoRA merges), kept factored.

Version v is the change made by round v: per module W_base += u @ v (nn.Linear orientation, u is m×q,
v is q×n, q ≤ K·r). Workers replay the entries they have not applied yet; the communication ledger
charges a client that missed versions min(m·n, Σ factored sizes) per module to catch up.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.lora.factors import BaseDelta

Delta = dict[str, tuple[np.ndarray, np.ndarray]]      # module -> (u, v), float64


class BaseDeltaLog:
    def __init__(self) -> None:
        self.entries: list[tuple[int, Delta]] = []

    @property
    def version(self) -> int:
        """The newest version (0: the base never changed)."""
        return self.entries[-1][0] if self.entries else 0

    def record(self, version: int, delta: dict[str, BaseDelta]) -> None:
        per_module = {k: (d.u.astype(np.float64), d.v.astype(np.float64)) for k, d in delta.items() if d.u.shape[1]}
        self.entries.append((version, per_module))

    def since(self, version: int) -> list[tuple[int, Delta]]:
        """The entries newer than `version`, oldest first."""
        return [(v, d) for v, d in self.entries if v > version]

    def catch_up_numel(self, version: int, shapes: dict[str, tuple[int, int]]) -> int:
        """Scalars a holder of `version` downloads to catch up: per module min(m·n, Σ missed factored sizes)."""
        missed: dict[str, int] = {}
        for _, per_module in self.since(version):
            for name, uv in per_module.items():
                missed[name] = missed.get(name, 0) + BaseDelta(*uv).numel()
        return sum(min(shapes[name][0] * shapes[name][1], size) for name, size in missed.items())

    def cumulative(self) -> dict[str, np.ndarray]:
        """W_base − W0 per module (m, n), float64."""
        out: dict[str, np.ndarray] = {}
        for _, per_module in self.entries:
            for name, (u, v) in per_module.items():
                out[name] = out.get(name, 0) + u @ v
        return out

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {f"{version}/{name}/{part}": np.ascontiguousarray(x)
                   for version, per_module in self.entries for name, uv in per_module.items()
                   for part, x in zip("uv", uv)}
        return tensors, {str(version): sorted(per_module) for version, per_module in self.entries}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.entries = [(int(v), {name: (np.array(tensors[f"{v}/{name}/u"]), np.array(tensors[f"{v}/{name}/v"]))
                                  for name in names})
                        for v, names in sorted(meta.items(), key=lambda kv: int(kv[0]))]
