"""The by_column partition: value assignment, even splits, seeding, errors and the federated view."""

import numpy as np
import pytest

from raysim.config import ConfigError, ExperimentConfig
from raysim.data.federated import split_and_partition
from raysim.data.partition import partition
from raysim.data.sources import load_source
from raysim.schema import ByColumnPartition

VALUES = np.repeat(np.array(["a", "b", "c", "d", "e"]), [100, 80, 60, 40, 20])
np.random.default_rng(0).shuffle(VALUES)
LABELS = np.zeros(len(VALUES), dtype=np.int64)


def _split(num_clients, values_per_client=1, seed=0, min_samples=4, values=VALUES):
    cfg = ByColumnPartition(scheme="by_column", column="topic", values_per_client=values_per_client,
                            min_samples=min_samples)
    return partition(np.zeros(len(values), dtype=np.int64), num_clients, cfg, seed, {"topic": values})


def _values_of(parts, values=VALUES):
    return [set(values[p].tolist()) for p in parts]


def test_one_value_per_client_shared_evenly():
    parts = _split(num_clients=10)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(VALUES) and len(np.unique(allidx)) == len(VALUES)   # disjoint, covering
    owned = _values_of(parts)
    assert all(len(v) == 1 for v in owned)
    for value in "abcde":
        holders = [k for k, v in enumerate(owned) if v == {value}]
        assert len(holders) == 2                                  # 10 clients round-robin over 5 values
        sizes = [len(parts[k]) for k in holders]
        assert sum(sizes) == np.sum(VALUES == value) and max(sizes) - min(sizes) <= 1
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_several_values_per_client_cover_every_value():
    parts = _split(num_clients=4, values_per_client=2)
    owned = _values_of(parts)
    assert all(len(v) == 2 for v in owned)
    assert set().union(*owned) == set("abcde")                    # 4 x 2 slots >= 5 values
    assert len(np.concatenate(parts)) == len(VALUES)


def test_fewer_slots_than_values_leaves_some_values_unused():
    parts = _split(num_clients=2)
    owned = _values_of(parts)
    assert all(len(v) == 1 for v in owned) and owned[0] != owned[1]
    used = owned[0] | owned[1]
    assert len(np.concatenate(parts)) == int(np.isin(VALUES, list(used)).sum())


def test_assignment_is_seeded():
    first = _split(num_clients=5, seed=3)
    again = _split(num_clients=5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    orders = {tuple(next(iter(v)) for v in _values_of(_split(num_clients=5, seed=s))) for s in range(6)}
    assert len(orders) > 1                                        # the value order depends on the seed


def test_errors_name_the_keys():
    with pytest.raises(ConfigError) as err:
        partition(LABELS, 4, ByColumnPartition(scheme="by_column", column="nope"), 0, {"topic": VALUES})
    assert str(err.value) == "data.partition.column: column 'nope' not found in the data; columns: topic"
    with pytest.raises(ConfigError, match=r"columns: \(none\)$"):
        partition(LABELS, 4, ByColumnPartition(scheme="by_column", column="nope"), 0)
    with pytest.raises(ConfigError, match=r"^data\.partition\.values_per_client: 6 is more than the 5"):
        _split(num_clients=2, values_per_client=6)
    rare = np.array(["x"] * 200 + ["y"] * 5)
    with pytest.raises(ConfigError, match=r"^data\.partition\.min_samples: client \d+ gets only 2 .*: y\)"):
        _split(num_clients=4, min_samples=4, values=rare)        # 5 'y' examples shared by 2 clients


def test_federated_view_by_operator_of_arith():
    cfg = ExperimentConfig.model_validate({
        "seed": 1, "task": {"type": "causal_lm"},
        "data": {"source": "synthetic:arith", "arith": {"num_examples": 600},
                 "partition": {"scheme": "by_column", "column": "operator", "min_samples": 8}},
        "federation": {"num_clients": 6, "clients_per_round": 3},
    })
    raw = load_source(cfg.data, cfg.seed, task=cfg.task.type)
    test_idx, train, local = split_and_partition(raw, cfg)
    ops = raw.columns["operator"]
    for k in range(6):
        assert len(set(ops[np.concatenate([train[k], local[k]])].tolist())) == 1
    assert sorted(set().union(*(set(ops[t].tolist()) for t in train))) == ["*", "+", "-"]
    share = np.bincount(raw.labels[test_idx], minlength=3) / len(test_idx)
    assert np.all(np.abs(share - np.bincount(raw.labels) / len(raw)) < 0.02)   # stratified by operator
    allidx = np.concatenate([test_idx, *train, *local])
    assert np.array_equal(np.sort(allidx), np.arange(600))
