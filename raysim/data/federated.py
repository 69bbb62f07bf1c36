"""The federated view of a data set: a global test split plus per-client train/test indices.

Order of operations (all seeded by ``cfg.seed``):

1. a stratified global test split of ``data.test_fraction`` of all examples;
2. the remaining pool is partitioned across ``federation.num_clients`` clients with
   ``data.partition`` (``min_samples`` applies to each client's whole partition; ``by_column`` reads
   the column from ``raw.columns`` and may leave examples of values no client draws unused;
   ``groups`` checks its label ids against ``raw.num_labels`` and leaves examples whose label is in
   no group, or in a group without clients, unused);
3. each client's partition is split at random into local train and local test
   (``data.local_test_fraction``; at least one local train sample, and at least one local test
   sample whenever the fraction is > 0 and the client holds >= 2 samples).
"""

from __future__ import annotations

import numpy as np

from raysim.errors import ConfigError
from raysim.data.partition import partition, stratified_sample
from raysim.data.sources import RawData
from raysim.seeds import LOCAL_SPLIT, TEST_SPLIT


def split_and_partition(raw: RawData, cfg) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Global test split, client partition and local test splits for ``raw``.

    Args:
        raw: the N examples (``raw.labels``, and ``raw.columns`` for ``by_column``).
        cfg: the ExperimentConfig (``seed``, ``data.test_fraction``, ``data.local_test_fraction``,
            ``data.partition``, ``federation.num_clients``).

    Returns:
        (test_idx, client_train, client_test): sorted int64 index arrays into ``raw``; all
        disjoint, together covering every example (except the unused ones of ``by_column`` and
        ``groups``).

    Raises:
        ConfigError: data that does not fit the task (see `check_task_data`), too few examples for
            the test split or for the clients' ``min_samples``, or a partition problem (see
            `raysim.data.partition.partition`).
    """
    check_task_data(raw, cfg)
    labels = np.asarray(raw.labels)
    n = len(labels)
    if n < 2:
        raise ConfigError(f"data.source: need at least 2 examples for a test split, got {n}")
    n_test = min(max(1, round(n * cfg.data.test_fraction)), n - 1)
    test_idx = stratified_sample(labels, n_test, np.random.default_rng([cfg.seed, TEST_SPLIT]))
    pool = np.setdiff1d(np.arange(n, dtype=np.int64), test_idx)

    columns = {name: np.asarray(values)[pool] for name, values in raw.columns.items()}
    parts = partition(labels[pool], cfg.federation.num_clients, cfg.data.partition, cfg.seed, columns,
                      num_labels=raw.num_labels)

    rng = np.random.default_rng([cfg.seed, LOCAL_SPLIT])
    client_train, client_test = [], []
    for part in parts:
        members = pool[part]
        n_local_test = local_test_size(len(members), cfg.data.local_test_fraction)
        shuffled = rng.permutation(members)
        client_test.append(np.sort(shuffled[:n_local_test]).astype(np.int64))
        client_train.append(np.sort(shuffled[n_local_test:]).astype(np.int64))
    return test_idx, client_train, client_test


def check_task_data(raw: RawData, cfg) -> None:
    """ConfigError when the loaded data lacks what the config asks for: numeric targets for
    ``task.type: regression``, second sentences for ``data.text_pair_column``."""
    if cfg.task.type == "regression" and raw.targets is None:
        raise ConfigError(f"data.source: {cfg.data.source} has class labels, not numeric scores; task.type "
                          "regression needs synthetic:regression or a parquet/csv/jsonl/hf-disk source whose "
                          "data.label_column holds numbers")
    if cfg.data.text_pair_column is not None and raw.text_pairs is None:
        raise ConfigError(f"data.text_pair_column: data.source {cfg.data.source} has no sentence pairs (only "
                          "parquet/csv/jsonl/hf-disk sources read a second text column; synthetic:text-pair "
                          "generates its pairs itself); set data.text_pair_column: null")


def local_test_size(n: int, fraction: float) -> int:
    """Local test size for a client with n samples: about n·fraction, keeping >= 1 train sample."""
    if fraction <= 0 or n < 2:
        return 0
    return int(min(max(1, round(n * fraction)), n - 1))
