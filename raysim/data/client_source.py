"""The contract of a per-client data source (see `raysim.data.per_client`): one client's examples at a time."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from raysim.data.raw import RawData

PARQUET_DATASET = "parquet-dataset:"


class PerClientData(ABC):
    """Clients whose examples are built one at a time; small and picklable (sent to every worker).

    Attributes:
        num_clients: the training clients (``federation.num_clients``); ids 0 .. num_clients - 1.
        label_names: the label vocabulary, the same for every client.
    """

    num_clients: int
    label_names: list[str]
    _transient: tuple[str, ...] = ()       # caches left out of the pickle, rebuilt on demand

    @abstractmethod
    def sizes(self) -> np.ndarray:
        """(num_clients,) int64: the examples of each training client (local train + local test)."""

    @abstractmethod
    def client(self, cid: int) -> RawData:
        """The examples of training client ``cid``, identical on every call and in every process."""

    @abstractmethod
    def test_set(self) -> RawData:
        """The held-out clients' examples, concatenated: the global test set."""

    @abstractmethod
    def describe(self) -> dict:
        """Small facts for the run summary (source, clients, held-out clients, test examples, ...)."""

    def _check_id(self, cid: int) -> int:
        if not 0 <= int(cid) < self.num_clients:
            raise IndexError(f"client id {cid} out of range 0..{self.num_clients - 1}")
        return int(cid)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._transient}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name in self._transient:
            setattr(self, name, None)
