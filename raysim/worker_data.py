"""Per-client examples on a worker (per-client data sources): read or generated when a client is trained or
evaluated, tokenised once, and kept in a least-recently-used cache of bounded size.

A call that trains or evaluates several clients gets their examples stacked into one table (`gather`), with each
client's first row in it, so the engines index one table exactly as they do with pooled data. Token ids stay
in the compact dtypes of tokenisation (int32 ids, int8 masks).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np

# what only the global test set needs (evaluation by generation); never stacked for clients
GENERATION_KEYS = ("prompt_ids", "prompt_mask", "response_text")
DEFAULT_CACHE_BYTES = 256 << 20


class ClientExamples:
    """The tokenised examples of the clients this worker met last, up to `max_bytes` in all."""

    def __init__(self, per_client, task, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.source = per_client
        self.task = task
        self.task.disk_cache = False               # one client's examples are not worth a cache file
        self.max_bytes = max_bytes
        self.cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def arrays(self, cid: int) -> dict[str, np.ndarray]:
        """Client `cid`'s tokenised examples (all of them: training and local test rows)."""
        if cid in self.cache:
            self.cache.move_to_end(cid)
            self.hits += 1
            return self.cache[cid]
        self.misses += 1
        raw = self.source.client(cid)
        arrays = {k: v for k, v in self.task.arrays(raw).items() if k not in GENERATION_KEYS}
        self.cache[cid] = arrays
        self.bytes += _nbytes(arrays)
        while self.bytes > self.max_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.bytes -= _nbytes(old)
        return arrays

    def gather(self, cids: Iterable[int]) -> tuple[dict[str, np.ndarray], dict[int, int]]:
        """The examples of the distinct clients `cids` stacked into one table, and each client's first row."""
        distinct = list(dict.fromkeys(int(c) for c in cids))
        parts = [self.arrays(c) for c in distinct]
        offsets, start = {}, 0
        for cid, part in zip(distinct, parts):
            offsets[cid] = start
            start += len(part["labels"])
        table = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return table, offsets


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(getattr(v, "nbytes", 0) for v in arrays.values()))
