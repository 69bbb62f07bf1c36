"""Which examples each client trains and tests on, for pooled and for per-client data.

- Pooled data (every source but the per-client ones): one tokenised table in the object store; a client's
  rows are global row numbers into it, fixed by the partition the driver computed.
- Per-client data (`parquet-dataset:DIR`, or synthetic data with `data.synthetic.examples_per_client`): a
  client's examples exist only while a worker holds them; its rows are local row numbers into its own examples,
  derived from its size, the seed and its id when asked (O(that client), nothing kept per client but its size).

Both answer the same questions: a client's training rows, its local test rows, and the training-set sizes of all
clients (for ranks by data size and for aggregation weights).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class _Rows(Sequence):
    """A read-only list of each client's rows, computed on access (client id -> int64 rows)."""

    def __init__(self, count: int, rows_of):
        self._count, self._rows_of = count, rows_of

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, cid):
        if not 0 <= int(cid) < self._count:
            raise IndexError(cid)
        return self._rows_of(int(cid))


class PooledClients:
    """Clients of a partitioned pool: rows are global rows of the one data table."""

    per_client = None                                      # no per-client source

    def __init__(self, client_train: list[np.ndarray], client_test: list[np.ndarray]):
        self.train = [np.asarray(x) for x in client_train]
        self.test = [np.asarray(x) for x in client_test]
        self.num_clients = len(self.train)

    def train_sizes(self) -> np.ndarray:
        return np.asarray([len(t) for t in self.train], dtype=np.int64)


class PerClientClients:
    """Clients whose examples are read or generated one client at a time: rows are local to the client."""

    def __init__(self, per_client, local_test_fraction: float, seed: int):
        from raysim.data.federated import local_test_size

        self.per_client = per_client
        self.num_clients = int(per_client.num_clients)
        self.fraction, self.seed = float(local_test_fraction), int(seed)
        self.sizes = np.asarray(per_client.sizes(), dtype=np.int64)
        # local test sizes depend on the size only: compute them once per distinct size
        distinct, which = np.unique(self.sizes, return_inverse=True)
        n_test = np.asarray([local_test_size(int(n), self.fraction) for n in distinct], dtype=np.int64)
        self._train_sizes = self.sizes - n_test[which].reshape(self.sizes.shape)
        self.train = _Rows(self.num_clients, lambda cid: self._split(cid)[0])
        self.test = _Rows(self.num_clients, lambda cid: self._split(cid)[1])

    def _split(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        from raysim.data.per_client import local_split

        return local_split(int(self.sizes[cid]), self.fraction, self.seed, cid)

    def train_sizes(self) -> np.ndarray:
        return self._train_sizes


def client_index(partition: dict[str, Any], cfg) -> "PooledClients | PerClientClients":
    """The client rows of a prepared partition (`raysim.runner.prepare_data`)."""
    if partition.get("per_client") is not None:
        return PerClientClients(partition["per_client"], cfg.data.local_test_fraction, cfg.seed)
    return PooledClients(partition["client_train"], partition["client_test"])
