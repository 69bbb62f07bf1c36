"""Split a labelled training pool across simulated clients.

`partition(labels, num_clients, cfg, seed, columns)` implements the schemes of `data.partition`:

- ``iid``: a random, equal-size split.
- ``dirichlet``: label skew. For every class, the share of each client is drawn from
  Dir(alpha · 1) (the usual FL recipe of Hsu et al. 2019 / NIID-Bench, including its balancing step
  that stops giving samples to clients already above N / num_clients). Large alpha gives every
  client roughly the global label mix; small alpha gives each client one or two dominant labels.
- ``shards``: the pathological split of McMahan et al. 2017: sort by label, cut into
  ``num_clients · shards_per_client`` contiguous shards, give each client ``shards_per_client``
  random shards.
- ``quantity_skew``: client sizes ~ Dir(alpha) · N (each at least ``min_samples``), labels IID.
- ``by_column``: natural non-IID by a data column (see `by_column`): each client draws from
  ``values_per_client`` values of the column.
- ``groups``: label groups (CE-LoRA's setting, see `label_groups`): client k belongs to group
  ``k mod G`` and draws only examples whose label is in its group.

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
from raysim.schema import ByColumnPartition, GroupsPartition

DIRICHLET_MAX_TRIES = 100


def partition(labels: np.ndarray, num_clients: int, cfg, seed: int,
              columns: dict[str, np.ndarray] | None = None, num_labels: int | None = None) -> list[np.ndarray]:
    """Partition ``labels`` (shape (N,), ints) across ``num_clients`` clients.

    Args:
        labels: (N,) integer class labels of the training pool.
        num_clients: number of clients K (>= 1).
        cfg: one of the partition configs (``IIDPartition``, ``DirichletPartition``,
            ``ShardsPartition``, ``QuantitySkewPartition``, ``ByColumnPartition``, ``GroupsPartition``).
        seed: seed of ``np.random.default_rng``.
        columns: the pool's other columns, name -> (N,) values (``by_column`` reads ``cfg.column``).
        num_labels: size of the label space (``groups`` refuses labels outside it); default
            ``max(labels) + 1``.

    Returns:
        K sorted int64 arrays of indices into ``labels``; they are disjoint and each holds at least
        ``cfg.min_samples`` indices. They cover ``range(N)``, except with ``by_column`` when some
        values of the column are drawn by no client (fewer client slots than values) and with
        ``groups`` (labels in no group, groups without clients).

    Raises:
        ConfigError: too little data for ``num_clients * min_samples``, a ``by_column`` or ``groups``
            problem (see ``by_column``, ``check_groups``), or such a client below ``min_samples``.
    """
    labels = np.asarray(labels)
    n, min_samples = len(labels), cfg.min_samples
    num_labels = int(labels.max(initial=-1)) + 1 if num_labels is None else int(num_labels)
    _check_sizes(labels, num_clients, cfg, num_labels)
    rng = np.random.default_rng(seed)

    if isinstance(cfg, IIDPartition):
        parts = np.array_split(rng.permutation(n), num_clients)
    elif isinstance(cfg, DirichletPartition):
        parts = _dirichlet(labels, num_clients, cfg.alpha, min_samples, rng)
    elif isinstance(cfg, ShardsPartition):
        parts = _shards(labels, num_clients, cfg.shards_per_client, rng)
    elif isinstance(cfg, QuantitySkewPartition):
        parts = _quantity_skew(n, num_clients, cfg.alpha, min_samples, rng)
    elif isinstance(cfg, ByColumnPartition):
        return by_column(_column(columns or {}, cfg.column, n), num_clients, cfg.values_per_client,
                         min_samples, rng)
    elif isinstance(cfg, GroupsPartition):
        return label_groups(labels, num_clients, cfg.groups, num_labels, min_samples, rng)
    else:
        raise ConfigError(f"data.partition.scheme: unknown partition config {cfg!r}; "
                          "allowed: iid, dirichlet, shards, quantity_skew, by_column, groups")

    parts = _ensure_min_samples([np.asarray(p, dtype=np.int64) for p in parts], min_samples, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _check_sizes(labels: np.ndarray, num_clients: int, cfg, num_labels: int) -> None:
    """ConfigErrors for a partition that cannot work: no clients, a wrong label in `groups` (reported before
    any size problem), or fewer examples than num_clients × min_samples."""
    if num_clients < 1:
        raise ConfigError(f"federation.num_clients must be >= 1 (got {num_clients})")
    if isinstance(cfg, GroupsPartition):
        check_groups(cfg.groups, num_labels)
    need, n = num_clients * cfg.min_samples, len(labels)
    if need > n:
        raise ConfigError(
            f"federation.num_clients: {num_clients} clients × min_samples {cfg.min_samples} needs "
            f"{need} samples but the training pool has only {n}; use fewer clients, "
            f"a smaller data.partition.min_samples, a smaller data.test_fraction or more data")


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


# ----------------------------------------------------------------------------- by_column


def by_column(values: np.ndarray, num_clients: int, values_per_client: int, min_samples: int,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Each client draws from ``values_per_client`` distinct values of a column.

    The distinct values are put in a seeded random order and dealt out round-robin: client k gets
    values ``order[(k · values_per_client + j) mod V]`` for j < values_per_client, so every value
    has at least one client when ``num_clients · values_per_client >= V``. The examples of a value
    are shuffled and split evenly among the clients holding it; examples of a value that no client
    holds are used by nobody.

    Args:
        values: (N,) column values of the training pool.
        num_clients, values_per_client, min_samples: as in the config.
        rng: the partition's random generator.

    Returns:
        num_clients sorted int64 index arrays, disjoint.

    Raises:
        ConfigError: ``values_per_client`` above the number of values, or a client below ``min_samples``.
    """
    uniq, codes = np.unique(np.asarray(values), return_inverse=True)
    if values_per_client > len(uniq):
        raise ConfigError(f"data.partition.values_per_client: {values_per_client} is more than the "
                          f"{len(uniq)} distinct values of the column ({', '.join(map(str, uniq))})")
    order = rng.permutation(len(uniq))
    holders: list[list[int]] = [[] for _ in uniq]
    for client in range(num_clients):
        for j in range(values_per_client):
            holders[order[(client * values_per_client + j) % len(uniq)]].append(client)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for value, clients in enumerate(holders):
        if not clients:
            continue
        members = rng.permutation(np.flatnonzero(codes == value))
        for client, chunk in zip(clients, np.array_split(members, len(clients))):
            parts[client].append(chunk)
    out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    _check_min_samples(out, holders, uniq, min_samples)
    return out


def _column(columns: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """The (n,) values of column ``name``; a ConfigError naming the key when there is no such column."""
    if name not in columns:
        have = ", ".join(sorted(columns)) or "(none)"
        raise ConfigError(f"data.partition.column: column {name!r} not found in the data; columns: {have}")
    values = np.asarray(columns[name])
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} examples")
    return values


def _check_min_samples(parts: list[np.ndarray], holders: list[list[int]], uniq: np.ndarray,
                       min_samples: int) -> None:
    """ConfigError naming the smallest client when it holds fewer than ``min_samples`` examples."""
    sizes = np.array([len(p) for p in parts])
    short = int(np.argmin(sizes))
    if sizes[short] >= min_samples:
        return
    mine = [str(uniq[v]) for v, clients in enumerate(holders) if short in clients]
    raise ConfigError(
        f"data.partition.min_samples: client {short} gets only {sizes[short]} training examples (its "
        f"column values: {', '.join(mine)}) but min_samples is {min_samples}; "
        "use fewer clients, more values_per_client, a smaller data.partition.min_samples or more data")


# ----------------------------------------------------------------------------- groups


def label_groups(labels: np.ndarray, num_clients: int, groups: list[list[int]], num_labels: int,
                 min_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client draws only from one group's labels.

    Client k belongs to group ``k mod G`` (so group sizes differ by at most one client). The examples
    whose label is in a group are shuffled and split evenly among the group's clients (IID within the
    group). Examples whose label is in no group, and the examples of groups without clients (fewer
    clients than groups), are used by nobody.

    Args:
        labels: (N,) integer labels of the training pool.
        num_clients, min_samples: as in the config.
        groups: ``data.partition.groups``, label ids per group.
        num_labels: size of the label space; every listed label must be below it.
        rng: the partition's random generator.

    Returns:
        num_clients sorted int64 index arrays, disjoint.

    Raises:
        ConfigError: a label in two groups, a label outside 0..num_labels-1, or a client below
            ``min_samples``.
    """
    check_groups(groups, num_labels)
    members = [rng.permutation(np.flatnonzero(np.isin(labels, group))) for group in groups]
    holders = [list(range(g, num_clients, len(groups))) for g in range(len(groups))]
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_clients
    for idx, clients in zip(members, holders):
        for client, chunk in zip(clients, np.array_split(idx, max(1, len(clients)))):
            parts[client] = np.sort(chunk).astype(np.int64)
    sizes = np.array([len(p) for p in parts])
    short = int(np.argmin(sizes))
    if sizes[short] < min_samples:
        group = short % len(groups)
        raise ConfigError(
            f"data.partition.min_samples: client {short} (group {group}, labels {groups[group]}) gets only "
            f"{sizes[short]} training examples but min_samples is {min_samples}; its group's "
            f"{len(members[group])} examples are shared by {len(holders[group])} clients; use fewer clients, "
            "larger groups, a smaller data.partition.min_samples or more data")
    return parts


def check_groups(groups: list[list[int]], num_labels: int) -> None:
    """ConfigError naming ``data.partition.groups`` for a label listed twice or outside 0..num_labels-1."""
    seen: dict[int, int] = {}
    for g, group in enumerate(groups):
        for label in group:
            if not 0 <= label < num_labels:
                raise ConfigError(f"data.partition.groups: label {label} (group {g}) is not a label of the data; "
                                  f"labels are 0..{num_labels - 1}")
            if label in seen:
                where = f"groups {seen[label]} and {g}" if seen[label] != g else f"group {g} twice"
                raise ConfigError(f"data.partition.groups: label {label} is in {where}; every label may be in "
                                  "at most one group")
            seen[label] = g
    if not seen:
        raise ConfigError("data.partition.groups: every group is empty; list label ids, e.g. [[0, 1], [2, 3]]")
