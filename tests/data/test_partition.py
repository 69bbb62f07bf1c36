"""Client partitions: coverage, determinism, min_samples and the skew each scheme produces."""

import numpy as np
import pytest

from raysim.config import (
    ConfigError,
    DirichletPartition,
    IIDPartition,
    QuantitySkewPartition,
    ShardsPartition,
)
from raysim.data.partition import partition, stratified_sample

LABELS = np.repeat(np.arange(5), 400)  # 2,000 samples, 5 balanced classes
np.random.default_rng(0).shuffle(LABELS)

SCHEMES = [
    IIDPartition(scheme="iid", min_samples=4),
    DirichletPartition(scheme="dirichlet", alpha=0.5, min_samples=4),
    ShardsPartition(scheme="shards", shards_per_client=2, min_samples=4),
    QuantitySkewPartition(scheme="quantity_skew", alpha=1.0, min_samples=4),
]


def _max_share(labels, parts):
    """Per client: the fraction of its samples that carry its most frequent label."""
    return np.array([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.scheme)
def test_disjoint_sorted_covering_with_min_samples(cfg):
    parts = partition(LABELS, 20, cfg, seed=0)
    assert len(parts) == 20
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS) and np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    assert min(len(p) for p in parts) >= 4


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.scheme)
def test_deterministic_per_seed(cfg):
    a = partition(LABELS, 10, cfg, seed=7)
    b = partition(LABELS, 10, cfg, seed=7)
    c = partition(LABELS, 10, cfg, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_equal_sizes_and_global_mix():
    parts = partition(LABELS, 8, IIDPartition(scheme="iid"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _max_share(LABELS, parts).max() < 0.3  # global share is 0.2


def test_dirichlet_alpha_controls_label_skew():
    iid_like = partition(LABELS, 20, DirichletPartition(scheme="dirichlet", alpha=1000.0), seed=0)
    skewed = partition(LABELS, 20, DirichletPartition(scheme="dirichlet", alpha=0.05), seed=0)
    glob = np.bincount(LABELS) / len(LABELS)
    tv = [0.5 * np.abs(np.bincount(LABELS[p], minlength=5) / len(p) - glob).sum() for p in iid_like]
    assert max(tv) < 0.15
    assert _max_share(LABELS, iid_like).mean() < 0.3
    assert _max_share(LABELS, skewed).mean() > 0.7


def test_dirichlet_min_samples_enforced_when_resampling_cannot():
    cfg = DirichletPartition(scheme="dirichlet", alpha=0.01, min_samples=30)
    parts = partition(LABELS, 60, cfg, seed=1)
    assert min(len(p) for p in parts) >= 30
    assert len(np.unique(np.concatenate(parts))) == len(LABELS)


def test_shards_give_few_labels_per_client():
    parts = partition(LABELS, 20, ShardsPartition(scheme="shards", shards_per_client=2), seed=0)
    # 40 shards of 50: each class fills exactly 8 shards, so a client sees at most 2 labels
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


def test_shards_cover_everything_with_remainder():
    labels = LABELS[:1003]
    parts = partition(labels, 7, ShardsPartition(scheme="shards", shards_per_client=3), seed=0)
    assert sum(len(p) for p in parts) == 1003


def test_quantity_skew_sizes_follow_alpha():
    skew = [len(p) for p in partition(LABELS, 20, QuantitySkewPartition(scheme="quantity_skew", alpha=0.1,
                                                                        min_samples=5), seed=0)]
    even = [len(p) for p in partition(LABELS, 20, QuantitySkewPartition(scheme="quantity_skew", alpha=1000.0,
                                                                        min_samples=5), seed=0)]
    assert min(skew) >= 5 and sum(skew) == len(LABELS)
    assert np.std(skew) > 5 * np.std(even)
    assert max(even) - min(even) < 40


def test_too_many_clients_error_names_the_key():
    with pytest.raises(ConfigError) as err:
        partition(LABELS[:30], 10, IIDPartition(scheme="iid", min_samples=4), seed=0)
    msg = str(err.value)
    assert msg.startswith("federation.num_clients: 10 clients × min_samples 4 needs 40 samples")
    assert "training pool has only 30" in msg


def test_exactly_enough_samples():
    parts = partition(LABELS[:40], 10, DirichletPartition(scheme="dirichlet", alpha=0.1, min_samples=4), seed=0)
    assert [len(p) for p in parts] == [4] * 10


def test_stratified_sample_keeps_proportions():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    idx = stratified_sample(labels, 20, np.random.default_rng(0))
    assert len(idx) == 20 and len(np.unique(idx)) == 20 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [14, 4, 2]
    # every label survives even when its proportional share rounds to zero
    rare = np.array([0] * 98 + [1, 2])
    picked = rare[stratified_sample(rare, 5, np.random.default_rng(0))]
    assert len(picked) == 5 and set(picked.tolist()) == {0, 1, 2}
