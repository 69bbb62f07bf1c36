"""Per-client LoRA ranks from `lora.rank` (an int, a per-client list, or a heterogeneity spec)."""

from __future__ import annotations

import numpy as np

from raysim.config import ExperimentConfig, RankTiers
from raysim.sampling import derive_seed


def assign_ranks(cfg: ExperimentConfig) -> dict[int, int]:
    """client id -> rank. Tiers: exact counts round(fraction·N) (remainder to the first tier),
    assigned to a seeded random permutation of the clients."""
    n = cfg.federation.num_clients
    spec = cfg.lora.rank
    if isinstance(spec, int):
        return {c: spec for c in range(n)}
    if isinstance(spec, list):
        return {c: int(r) for c, r in enumerate(spec)}
    assert isinstance(spec, RankTiers)
    counts = [int(round(f * n)) for f in spec.fractions]
    counts[0] += n - sum(counts)
    order = np.random.default_rng(derive_seed(cfg.seed, 0x7A2C)).permutation(n)
    ranks, pos = {}, 0
    for rank, count in zip(spec.ranks, counts):
        for c in order[pos:pos + count]:
            ranks[int(c)] = int(rank)
        pos += count
    return ranks


def scale_for(cfg: ExperimentConfig):
    """s(r): PEFT's alpha / r for one shared rank; with mixed ranks one scale alpha / r_max for every
    client, so slot-wise averages combine columns of equal magnitude (ALGORITHMS.md §1.2)."""
    alpha = cfg.lora.alpha
    if isinstance(cfg.lora.rank, int):
        return lambda r: alpha / r
    r_max = cfg.lora.max_rank()
    return lambda r: alpha / r_max
