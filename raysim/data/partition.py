"""Split a labelled training pool across simulated clients.

`partition(labels, num_clients, cfg, seed)` implements the four schemes of `data.partition`:

- ``iid``: a random, equal-size split.
- ``dirichlet``: label skew. For every class, the share of each client is drawn from
  Dir(alpha · 1) (the usual FL recipe of Hsu et al. 2019 / NIID-Bench, including its balancing step
  that stops giving samples to clients already above N / num_clients). Large alpha gives every
  client roughly the global label mix; small alpha gives each client one or two dominant labels.
- ``shards``: the pathological split of McMahan et al. 2017: sort by label, cut into
  ``num_clients · shards_per_client`` contiguous shards, give each client ``shards_per_client``
  random shards.
- ``quantity_skew``: client sizes ~ Dir(alpha) · N (each at least ``min_samples``), labels IID.

Every client receives at least ``min_samples`` indices; the result is fully determined by ``seed``.
"""

from __future__ import annotations

import numpy as np

from raysim.config import (
    ConfigError,
    DirichletPartition,
    IIDPartition,
    QuantitySkewPartition,
    ShardsPartition,
)

DIRICHLET_MAX_TRIES = 100


def partition(labels: np.ndarray, num_clients: int, cfg, seed: int) -> list[np.ndarray]:
    """Partition ``labels`` (shape (N,), ints) across ``num_clients`` clients.

    Args:
        labels: (N,) integer class labels of the training pool.
        num_clients: number of clients K (>= 1).
        cfg: one of the partition configs (``IIDPartition``, ``DirichletPartition``,
            ``ShardsPartition``, ``QuantitySkewPartition``).
        seed: seed of ``np.random.default_rng``.

    Returns:
        K sorted int64 arrays of indices into ``labels``; they are disjoint, cover ``range(N)`` and
        each holds at least ``cfg.min_samples`` indices.

    Raises:
        ConfigError: if ``num_clients * min_samples`` exceeds N.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise ConfigError(f"federation.num_clients must be >= 1 (got {num_clients})")
    min_samples = cfg.min_samples
    if num_clients * min_samples > n:
        raise ConfigError(
            f"federation.num_clients: {num_clients} clients × min_samples {min_samples} needs "
            f"{num_clients * min_samples} samples but the training pool has only {n}; use fewer clients, "
            f"a smaller data.partition.min_samples, a smaller data.test_fraction or more data")
    rng = np.random.default_rng(seed)

    if isinstance(cfg, IIDPartition):
        parts = np.array_split(rng.permutation(n), num_clients)
    elif isinstance(cfg, DirichletPartition):
        parts = _dirichlet(labels, num_clients, cfg.alpha, min_samples, rng)
    elif isinstance(cfg, ShardsPartition):
        parts = _shards(labels, num_clients, cfg.shards_per_client, rng)
    elif isinstance(cfg, QuantitySkewPartition):
        parts = _quantity_skew(n, num_clients, cfg.alpha, min_samples, rng)
    else:
        raise ConfigError(f"data.partition.scheme: unknown partition config {cfg!r}; "
                          "allowed: iid, dirichlet, shards, quantity_skew")

    parts = _ensure_min_samples([np.asarray(p, dtype=np.int64) for p in parts], min_samples, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``size`` indices so that every label keeps (close to) its share of ``labels``.

    Per-label counts use the largest-remainder method, so they sum to exactly ``size``; when
    ``size`` is at least the number of present labels, every label keeps at least one example.

    Args:
        labels: (N,) integer labels.
        size: number of indices to draw, 0 <= size <= N.
        rng: random generator deciding which examples of each label are drawn.

    Returns:
        (size,) sorted int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = _largest_remainder(counts, size)
    if size >= len(classes):
        # keep every present label: move single slots from the largest quotas to empty ones
        for c in np.flatnonzero(quotas == 0):
            quotas[int(np.argmax(quotas))] -= 1
            quotas[c] = 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
              for c, q in zip(classes, quotas) if q > 0]
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# ----------------------------------------------------------------------------- schemes


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` (shape (K,)) that sum to exactly ``total``."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        # stable order: ties go to the lower index
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _draw_dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """(k,) proportions ~ Dir(alpha · 1); uniform in the (numerically degenerate) all-zero case."""
    props = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(props)) or props.sum() <= 0:
        return np.full(k, 1.0 / k)
    return props


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, min_samples: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skewed split; resampled until every client has ``min_samples`` (at most 100 tries)."""
    n = len(labels)
    classes = np.unique(labels)
    parts: list[np.ndarray] = []
    for _ in range(DIRICHLET_MAX_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = _draw_dirichlet(rng, alpha, num_clients)
            # balancing step: clients already holding their fair share get no more samples
            balanced = props * (sizes < n / num_clients)
            if balanced.sum() > 0:
                props = balanced
            props = props / props.sum()
            cuts = (np.cumsum(props) * len(idx)).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                buckets[k].append(chunk)
                sizes[k] += len(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if sizes.min() >= min_samples:
            break
    return parts


def _shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label (random order within a label), cut into shards, deal them out at random."""
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    num_shards = num_clients * shards_per_client
    shards = np.array_split(order, num_shards)  # covers every index; sizes differ by at most 1
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def _quantity_skew(n: int, num_clients: int, alpha: float, min_samples: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Client sizes = min_samples + Dir(alpha) share of the rest; members drawn IID."""
    props = _draw_dirichlet(rng, alpha, num_clients)
    sizes = min_samples + _largest_remainder(props, n - num_clients * min_samples)
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def _ensure_min_samples(parts: list[np.ndarray], min_samples: int,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest clients to those below ``min_samples``.

    Requires ``len(parts) * min_samples <= sum of sizes`` (checked by `partition`), so a donor
    with more than ``min_samples`` always exists while some client is short.
    """
    parts = list(parts)
    while True:
        sizes = np.array([len(p) for p in parts])
        short = int(np.argmin(sizes))
        if sizes[short] >= min_samples:
            return parts
        donor = int(np.argmax(sizes))
        take = min(min_samples - sizes[short], sizes[donor] - min_samples)
        moved = rng.choice(len(parts[donor]), size=take, replace=False)
        keep = np.ones(len(parts[donor]), dtype=bool)
        keep[moved] = False
        parts[short] = np.concatenate([parts[short], parts[donor][moved]])
        parts[donor] = parts[donor][keep]
