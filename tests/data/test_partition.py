"""Client partitions: coverage, determinism, min_samples and the skew each scheme produces."""

import numpy as np
import pytest

from raysim.config import (
    ConfigError,
    DirichletPartition,
    ExperimentConfig,
    GroupsPartition,
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


# ----------------------------------------------------------------------------- label groups

GROUPS = [[0, 1], [2], [4]]                     # label 3 is in no group


def _groups(groups=GROUPS, min_samples=4) -> GroupsPartition:
    return GroupsPartition(scheme="groups", groups=groups, min_samples=min_samples)


def test_groups_clients_draw_only_their_groups_labels():
    parts = partition(LABELS, 8, _groups(), seed=0, num_labels=5)
    assert len(parts) == 8 and all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    for k, p in enumerate(parts):                                 # client k belongs to group k mod 3
        assert set(LABELS[p].tolist()) == set(GROUPS[k % 3])
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)                   # disjoint
    # every example of a grouped label is used, label 3 by nobody
    assert np.array_equal(np.sort(allidx), np.flatnonzero(LABELS != 3))
    # IID within the group: its clients split its examples evenly, each with the group's label mix
    for g, clients in enumerate([[0, 3, 6], [1, 4, 7], [2, 5]]):
        sizes = [len(parts[c]) for c in clients]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 400 * len(GROUPS[g])
    shares = [np.mean(LABELS[parts[c]] == 0) for c in (0, 3, 6)]
    assert all(abs(share - 0.5) < 0.1 for share in shares)


def test_groups_deterministic_per_seed_and_without_clients_for_some_groups():
    a, b = partition(LABELS, 6, _groups(), seed=1, num_labels=5), partition(LABELS, 6, _groups(), seed=1, num_labels=5)
    c = partition(LABELS, 6, _groups(), seed=2, num_labels=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    two = partition(LABELS, 2, _groups(), seed=0, num_labels=5)    # group 2 gets no client: label 4 unused
    assert set(LABELS[two[0]].tolist()) == {0, 1} and set(LABELS[two[1]].tolist()) == {2}


@pytest.mark.parametrize("groups,match", [
    ([[0, 1], [1, 2]], "label 1 is in groups 0 and 1"),
    ([[0, 0]], "label 0 is in group 0 twice"),
    ([[0], [5]], "label 5 \\(group 1\\) is not a label of the data; labels are 0..4"),
    ([[0], [-1]], "label -1 \\(group 1\\)"),
    ([[], []], "every group is empty"),
])
def test_groups_errors_name_the_key(groups, match):
    with pytest.raises(ConfigError, match=f"^data.partition.groups: {match}"):
        partition(LABELS, 4, _groups(groups), seed=0, num_labels=5)
    with pytest.raises(ConfigError, match="^data.partition.groups"):       # before the size check
        partition(LABELS[:10], 4, _groups(groups), seed=0, num_labels=5)


def test_groups_min_samples_names_the_short_client():
    labels = np.array([0] * 40 + [1] * 5)
    with pytest.raises(ConfigError, match=r"^data.partition.min_samples: client 3 \(group 1, labels \[1\]\) gets "
                                          r"only 2 training examples but min_samples is 4"):
        partition(labels, 4, _groups([[0], [1]]), seed=0, num_labels=2)
    assert [len(p) for p in partition(labels, 2, _groups([[0], [1]]), seed=0, num_labels=2)] == [40, 5]


def test_groups_through_the_federated_split_use_the_label_space():
    from raysim.data.federated import split_and_partition
    from raysim.data.sources import load_source

    def cfg(groups):
        return ExperimentConfig.model_validate({
            "data": {"source": "synthetic:text-cls", "local_test_fraction": 0.25,
                     "synthetic": {"num_examples": 400, "seq_len": 16, "vocab_size": 200, "num_labels": 4},
                     "partition": {"scheme": "groups", "groups": groups, "min_samples": 4}},
            "federation": {"num_clients": 4, "clients_per_round": 2}})

    good = cfg([[0, 1], [2, 3]])
    raw = load_source(good.data, good.seed)
    _, train, local = split_and_partition(raw, good)
    for k in range(4):
        assert set(raw.labels[np.concatenate([train[k], local[k]])].tolist()) <= set([[0, 1], [2, 3]][k % 2])
    with pytest.raises(ConfigError, match="^data.partition.groups: label 4"):
        split_and_partition(raw, cfg([[0, 1], [4]]))
