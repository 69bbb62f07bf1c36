"""The log of changes to the frozen base weights (FedEx-LoRA residuals, FLoRA merges), each in its
smaller form.

Version v is the change made by round v: per module W_base += u @ v (nn.Linear orientation, u is m×q,
v is q×n, q ≤ K·r), or, where q(m+n) > m·n, the dense m×n change itself, stored as the pair
(dense, None) (`raysim.lora.factors.delta_matrix` reads both forms). Workers replay the entries they
have not applied yet; `compact(upto)` merges the oldest entries into one once no worker needs them
apart. The communication ledger charges a client that missed versions min(m·n, Σ factored sizes) per
module to catch up; the sizes of every version are kept for it, through compaction and checkpoints, with
a running total per module (`catch_up_numel` is a binary search, not a scan over the versions).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

import numpy as np

from raysim.lora.factors import BaseDelta, compact_delta, delta_matrix

Pair = tuple[np.ndarray, np.ndarray | None]               # (u, v) factored, or (dense m×n, None)
Delta = dict[str, Pair]                                   # module -> pair, float64


def compacted(delta: dict[str, BaseDelta]) -> dict[str, BaseDelta]:
    """Each module's change factored or dense, whichever is smaller, float64; empty residuals (one client:
    nothing changes) left out."""
    out = {}
    for name, d in delta.items():
        if d.is_empty():
            continue
        if d.v is None:
            out[name] = BaseDelta(np.asarray(d.u, dtype=np.float64), None)
        else:
            out[name] = compact_delta(np.asarray(d.u, dtype=np.float64), np.asarray(d.v, dtype=np.float64))
    return out


class BaseDeltaLog:
    def __init__(self) -> None:
        self.entries: list[tuple[int, Delta]] = []
        self.sizes: dict[int, dict[str, int]] = {}        # version -> module -> scalars to send it
        self._versions: list[int] = []                    # the versions in `sizes`, ascending
        self._totals: dict[str, list[int]] = {}           # module -> Σ sizes up to each of `_versions`

    @property
    def version(self) -> int:
        """The newest version (0: the base never changed)."""
        return self.entries[-1][0] if self.entries else 0

    def record(self, version: int, delta: dict[str, BaseDelta]) -> None:
        """Append version `version`; each module is kept factored or dense, whichever is smaller."""
        sizes = {name: d.numel() for name, d in delta.items() if not d.is_empty()}
        self.entries.append((version, {name: (d.u, d.v) for name, d in compacted(delta).items()}))
        self._add_sizes(version, sizes)

    def newest(self, version: int) -> dict[str, BaseDelta] | None:
        """The change recorded as `version`, as stored (dense where that is smaller), or None if the newest
        entry is another version. The deviation metric reuses it rather than forming it again."""
        if not self.entries or self.entries[-1][0] != version:
            return None
        return {name: BaseDelta(u, v) for name, (u, v) in self.entries[-1][1].items()}

    def _add_sizes(self, version: int, sizes: dict[str, int]) -> None:
        """Record the sizes of `version` (newer than every one recorded) and extend the running totals."""
        if self._versions and version <= self._versions[-1]:
            raise ValueError(f"base version {version} is not newer than {self._versions[-1]}")
        self.sizes[version] = sizes
        for name in sizes:
            self._totals.setdefault(name, [0] * len(self._versions))
        for name, totals in self._totals.items():
            totals.append((totals[-1] if totals else 0) + sizes.get(name, 0))
        self._versions.append(version)

    def since(self, version: int) -> list[tuple[int, Delta]]:
        """The entries newer than `version`, oldest first."""
        return [(v, d) for v, d in self.entries if v > version]

    def catch_up_numel(self, version: int, shapes: dict[str, tuple[int, int]]) -> int:
        """Scalars a holder of `version` downloads to catch up: per module min(m·n, Σ missed factored sizes)."""
        held = bisect_right(self._versions, version)          # versions ≤ `version`: already applied
        if held == len(self._versions):
            return 0
        total = 0
        for name, totals in self._totals.items():
            missed = totals[-1] - (totals[held - 1] if held else 0)
            if missed:
                total += min(shapes[name][0] * shapes[name][1], missed)
        return total

    def compact(self, upto: int) -> None:
        """Merge the entries of versions ≤ `upto` into one entry of version `upto` (per module the sum,
        factored while that is smaller than m·n, else dense). Only for a log no holder of a version
        between the first and `upto` will replay: `since(v)` for such a v would repeat changes."""
        old = [(v, d) for v, d in self.entries if v <= upto]
        if len(old) < 2:
            return
        merged: dict[str, list[Pair]] = {}
        for _, per_module in old:
            for name, pair in per_module.items():
                merged.setdefault(name, []).append(pair)
        self.entries = [(old[-1][0], {name: _merge(pairs) for name, pairs in merged.items()})] + \
            [(v, d) for v, d in self.entries if v > upto]

    def cumulative(self) -> dict[str, np.ndarray]:
        """W_base − W0 per module (m, n), float64."""
        out: dict[str, np.ndarray] = {}
        for _, per_module in self.entries:
            for name, (u, v) in per_module.items():
                out[name] = out.get(name, 0) + delta_matrix(u, v)
        return out

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {}
        entries = {}
        for version, per_module in self.entries:
            entries[str(version)] = {}
            for name, (u, v) in per_module.items():
                tensors[f"{version}/{name}/u"] = np.ascontiguousarray(u)
                if v is not None:
                    tensors[f"{version}/{name}/v"] = np.ascontiguousarray(v)
                entries[str(version)][name] = "factored" if v is not None else "dense"
        return tensors, {"entries": entries, "sizes": {str(v): s for v, s in self.sizes.items()}}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Also reads the older format {version: [module, …]}, every entry factored."""
        if "entries" not in meta:
            meta = {"entries": {v: {name: "factored" for name in names} for v, names in meta.items()}}
        self.entries = []
        for v, kinds in sorted(meta["entries"].items(), key=lambda kv: int(kv[0])):
            self.entries.append((int(v), {name: (np.array(tensors[f"{v}/{name}/u"]),
                                                 np.array(tensors[f"{v}/{name}/v"]) if kind == "factored" else None)
                                          for name, kind in kinds.items()}))
        if "sizes" in meta:
            sizes = {int(v): {name: int(n) for name, n in s.items()} for v, s in meta["sizes"].items()}
        else:
            sizes = {v: {name: BaseDelta(*pair).numel() for name, pair in d.items()} for v, d in self.entries}
        self.sizes, self._versions, self._totals = {}, [], {}
        for v in sorted(sizes):
            self._add_sizes(v, sizes[v])


def _merge(pairs: list[Pair]) -> Pair:
    """The sum of a module's pairs in its smaller form: the stacked factors, or dense."""
    if all(v is not None for _, v in pairs):
        m, n = pairs[0][0].shape[0], pairs[0][1].shape[1]
        q = sum(u.shape[1] for u, _ in pairs)
        if q * (m + n) <= m * n:
            return np.concatenate([u for u, _ in pairs], axis=1), np.concatenate([v for _, v in pairs], axis=0)
    return sum(delta_matrix(u, v) for u, v in pairs), None
