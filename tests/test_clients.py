"""raysim.clients: each client's training and local test rows, for pooled and for per-client data."""

from __future__ import annotations

import numpy as np

from raysim.clients import PerClientClients, PooledClients, client_index
from raysim.config import validate_config
from raysim.data.per_client import open_per_client


def _cfg(**data):
    return validate_config({"seed": 3, "data": {"source": "synthetic:text-cls", "local_test_fraction": 0.25,
                                                "synthetic": {"examples_per_client": 10, "size_sigma": 0.8},
                                                "partition": {"scheme": "iid", "min_samples": 2}, **data},
                            "federation": {"num_clients": 500, "clients_per_round": 5}})


def test_per_client_rows_partition_each_clients_examples():
    cfg = _cfg()
    source = open_per_client(cfg)
    index = client_index({"per_client": source}, cfg)
    assert isinstance(index, PerClientClients) and index.num_clients == 500
    sizes = source.sizes()
    for cid in (0, 7, 250, 499):
        train, test = index.train[cid], index.test[cid]
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(sizes[cid]))   # disjoint, complete
        assert index.train_sizes()[cid] == len(train)
        assert len(test) == round(sizes[cid] * 0.25) or len(test) == sizes[cid] - 1
    # the sizes of all clients come without building any client's rows, and agree with the rows
    picks = np.random.default_rng(0).choice(500, 40, replace=False)
    assert all(index.train_sizes()[c] == len(index.train[c]) for c in picks)
    assert len(index.train) == 500


def test_pooled_rows_are_the_partition_itself():
    train = [np.array([0, 3]), np.array([1, 2, 5])]
    test = [np.array([4]), np.array([], dtype=np.int64)]
    index = client_index({"client_train": train, "client_test": test}, _cfg())
    assert isinstance(index, PooledClients) and index.per_client is None
    assert index.train_sizes().tolist() == [2, 3]
    assert index.test[0].tolist() == [4] and index.train[1].tolist() == [1, 2, 5]
