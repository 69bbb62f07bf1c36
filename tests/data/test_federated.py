"""The federated view: global test split, client partitions and local test splits."""

import numpy as np
import pytest

from raysim.config import ConfigError, ExperimentConfig
from raysim.data.federated import split_and_partition
from raysim.data.sources import load_source


def _cfg(seed=0, num_clients=10, partition=None, **data):
    data.setdefault("source", "synthetic:text-cls")
    data.setdefault("synthetic", {"num_examples": 500, "seq_len": 16, "vocab_size": 200, "num_labels": 4})
    data["partition"] = partition or {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 8}
    return ExperimentConfig.model_validate({
        "seed": seed, "data": data,
        "federation": {"num_clients": num_clients, "clients_per_round": min(5, num_clients)},
    })


def test_splits_are_disjoint_and_cover_everything():
    cfg = _cfg()
    raw = load_source(cfg.data, cfg.seed)
    test_idx, train, local = split_and_partition(raw, cfg)
    assert len(train) == len(local) == 10
    allidx = np.concatenate([test_idx, *train, *local])
    assert len(allidx) == 500 and np.array_equal(np.sort(allidx), np.arange(500))
    for arr in [test_idx, *train, *local]:
        assert arr.dtype == np.int64 and np.all(np.diff(arr) > 0)


def test_global_test_split_is_stratified():
    cfg = _cfg(test_fraction=0.3)
    raw = load_source(cfg.data, cfg.seed)
    test_idx, _, _ = split_and_partition(raw, cfg)
    assert len(test_idx) == 150
    expected = np.bincount(raw.labels) * 0.3
    assert np.all(np.abs(np.bincount(raw.labels[test_idx], minlength=4) - expected) <= 1)


def test_local_test_split_and_min_samples_before_split():
    cfg = _cfg(local_test_fraction=0.25)
    raw = load_source(cfg.data, cfg.seed)
    _, train, local = split_and_partition(raw, cfg)
    for tr, te in zip(train, local):
        n = len(tr) + len(te)
        assert n >= 8  # min_samples applies to the whole partition
        assert len(te) == min(max(1, round(n * 0.25)), n - 1) and len(tr) >= 1


def test_no_local_test_split():
    cfg = _cfg(local_test_fraction=0.0)
    _, train, local = split_and_partition(load_source(cfg.data, 0), cfg)
    assert all(len(te) == 0 for te in local) and sum(map(len, train)) == 400


def test_deterministic_per_seed():
    a = split_and_partition(load_source(_cfg().data, 0), _cfg(seed=0))
    b = split_and_partition(load_source(_cfg().data, 0), _cfg(seed=0))
    c = split_and_partition(load_source(_cfg().data, 0), _cfg(seed=1))
    flat = lambda r: [r[0], *r[1], *r[2]]  # noqa: E731
    assert all(np.array_equal(x, y) for x, y in zip(flat(a), flat(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(flat(a), flat(c)))


def test_more_clients_than_samples_is_a_config_error():
    cfg = _cfg(num_clients=60, partition={"scheme": "iid", "min_samples": 8})
    with pytest.raises(ConfigError, match=r"^federation\.num_clients: 60 clients × min_samples 8 .*only 400"):
        split_and_partition(load_source(cfg.data, 0), cfg)
