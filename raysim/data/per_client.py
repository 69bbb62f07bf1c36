"""Per-client data: each client's examples are generated or read on their own, when that client is needed.

The pooled sources load every example on the driver, split off a global test set and partition the rest
over the clients. That cannot hold a million clients. Per-client data never holds all examples at once:
the driver keeps one small number per client (its size) and a worker builds a client's examples when it
trains that client, identically in every process. Two sources work this way:

- ``synthetic:text-cls`` with ``data.synthetic.examples_per_client`` set: client ``c``'s examples are
  generated from (seed, ``c``). Client sizes are lognormal around ``examples_per_client`` with spread
  ``data.synthetic.size_sigma`` (mean-preserving: ``examples_per_client * exp(sigma * z - sigma^2 / 2)``,
  rounded; ``size_sigma: 0`` makes every client the same size), and never below
  ``data.partition.min_samples`` or 2. The label mix of a client is uniform (``partition.scheme: iid``) or
  drawn from Dirichlet(``partition.alpha``) (``dirichlet``); other schemes are refused. The token rows
  are made exactly like the pooled ``synthetic:text-cls`` source (same class key tokens for the seed).
- ``parquet-dataset:DIR``: a folder of Parquet files (any layout, hive partitions such as
  ``region=eu/part-0.parquet`` included) with a ``data.client_column`` naming each row's client; every
  distinct value is one client. Opening the data reads only that column (and ``data.label_column`` to
  build the label vocabulary); a client's rows are read with a filter on the client column, in the
  files' row order. Clients with fewer than ``data.partition.min_samples`` rows are skipped, and rows
  without a client value are ignored. The data's own clients ARE the partition: any
  ``data.partition.scheme`` is accepted, and only its ``min_samples`` is used. Reading a client is fastest
  when the files are sorted (or partitioned) by the client column, so Parquet statistics skip the rest.
  Columns: ``task.type: seq_cls`` reads ``data.text_column``, ``data.label_column`` (and
  ``data.text_pair_column`` when set); ``causal_lm`` reads ``data.prompt_column`` +
  ``data.response_column``, or ``data.text_column`` alone (``data.label_column`` groups the examples
  when the files have it).

Held-out test clients: ``data.test_clients`` whole clients are kept out of training and their examples,
concatenated, form the global test set (``data.test_fraction`` is not used). For the synthetic source they
are clients ``num_clients ... num_clients + test_clients - 1`` (generated the same way); for a Parquet
dataset they are chosen at random (seeded), and ``federation.num_clients`` training clients are then
chosen at random from the rest and numbered 0, 1, ... in order of their client value. Each training
client's examples are split into local train and local test with `local_split`
(``data.local_test_fraction``).

``data.max_examples`` and ``data.label_noise`` are not supported with per-client data.
"""

from __future__ import annotations

import numpy as np

from raysim.config import DataConfig
from raysim.data.client_source import PARQUET_DATASET, PerClientData
from raysim.data.federated import local_test_size
from raysim.data.raw import RawData
from raysim.data.sources import synthetic_key_tokens, synthetic_rows
from raysim.errors import ConfigError
from raysim.seeds import CLIENT_LOCAL_SPLIT, CLIENT_SIZES, SYNTHETIC_CLIENT



def is_per_client(data: DataConfig) -> bool:
    """Whether ``data`` names per-client data (a Parquet dataset, or per-client synthetic data)."""
    return data.source.startswith(PARQUET_DATASET) or (
        data.source == "synthetic:text-cls" and data.synthetic.examples_per_client is not None)


def open_per_client(cfg) -> "PerClientData":
    """The per-client data of the ExperimentConfig ``cfg`` (cheap: no client's examples are built).

    Raises:
        ConfigError: a setting per-client data does not support, or data that does not fit the config;
            the message names the key.
    """
    data = cfg.data
    if not is_per_client(data):
        raise ConfigError(f"data.source: {data.source} is pooled data; per-client data is "
                          "parquet-dataset:DIR, or synthetic:text-cls with data.synthetic.examples_per_client")
    _check_common(cfg)
    if data.source.startswith(PARQUET_DATASET):
        from raysim.data.per_client_parquet import ParquetClients

        return ParquetClients(cfg)
    return SyntheticClients(cfg)


def _check_common(cfg) -> None:
    data = cfg.data
    if data.max_examples is not None:
        raise ConfigError(f"data.max_examples: not supported with per-client data (got {data.max_examples}); "
                          "set it to null and size the data with the clients instead")
    if data.label_noise is not None:
        raise ConfigError("data.label_noise: not supported with per-client data; set it to null")
    if cfg.task.type != "causal_lm" and (data.prompt_column is not None or data.response_column is not None):
        key = "data.prompt_column" if data.prompt_column is not None else "data.response_column"
        raise ConfigError(f"{key}: prompt/response columns are for task.type: causal_lm "
                          f"(task.type is {cfg.task.type})")


def local_split(n: int, fraction: float, seed: int, cid: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, test_rows) of client ``cid`` with ``n`` examples: sorted int64 row indices.

    The local test split holds about ``n * fraction`` rows (at least 1 when ``fraction > 0`` and
    ``n >= 2``, never all of them), chosen at random from the stream (seed, CLIENT_LOCAL_SPLIT, cid).
    """
    n_test = local_test_size(n, fraction)
    perm = np.random.default_rng([seed, CLIENT_LOCAL_SPLIT, cid]).permutation(n)
    return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)


class SyntheticClients(PerClientData):
    """``synthetic:text-cls`` generated per client: client sizes and examples follow from the seed alone."""

    _transient = ("_all_sizes",)

    def __init__(self, cfg) -> None:
        data, part = cfg.data, cfg.data.partition
        if cfg.task.type != "seq_cls":
            raise ConfigError(f"task.type: per-client synthetic:text-cls data is for seq_cls "
                              f"(got {cfg.task.type})")
        if part.scheme not in ("iid", "dirichlet"):
            raise ConfigError(f"data.partition.scheme: per-client data supports iid and dirichlet "
                              f"(got {part.scheme})")
        if data.text_pair_column is not None:
            raise ConfigError("data.text_pair_column: synthetic:text-cls has no sentence pairs; set it to null")
        self.num_clients = cfg.federation.num_clients
        self.num_test_clients = data.test_clients
        self.label_names = [f"class_{i}" for i in range(data.synthetic.num_labels)]
        self._seed = cfg.seed
        self._synthetic = data.synthetic
        self._alpha = part.alpha if part.scheme == "dirichlet" else None
        self._min_size = max(2, part.min_samples)
        self._keys = synthetic_key_tokens(data.synthetic, cfg.seed)   # also checks vocab_size vs num_labels
        self._all_sizes: np.ndarray | None = None

    def _sizes_with_test(self) -> np.ndarray:
        """(num_clients + test_clients,) int64 sizes, drawn together from one stream (cached, not pickled)."""
        if self._all_sizes is None:
            total = self.num_clients + self.num_test_clients
            sigma = self._synthetic.size_sigma
            z = np.random.default_rng([self._seed, CLIENT_SIZES]).standard_normal(total)
            sizes = np.rint(self._synthetic.examples_per_client * np.exp(sigma * z - sigma * sigma / 2))
            self._all_sizes = np.maximum(sizes, self._min_size).astype(np.int64)
        return self._all_sizes

    def sizes(self) -> np.ndarray:
        return self._sizes_with_test()[:self.num_clients].copy()

    def client(self, cid: int) -> RawData:
        return self._generate(self._check_id(cid))

    def test_set(self) -> RawData:
        parts = [self._generate(cid) for cid in range(self.num_clients, self.num_clients + self.num_test_clients)]
        return RawData(labels=np.concatenate([p.labels for p in parts]), label_names=list(self.label_names),
                       input_ids=np.concatenate([p.input_ids for p in parts]))

    def describe(self) -> dict:
        sizes = self._sizes_with_test()
        return {"source": "synthetic:text-cls (per client)", "clients": self.num_clients,
                "held_out_clients": self.num_test_clients,
                "test_examples": int(sizes[self.num_clients:].sum()),
                "train_clients_examples": int(sizes[:self.num_clients].sum()),
                "examples_per_client": self._synthetic.examples_per_client,
                "size_sigma": self._synthetic.size_sigma,
                "label_mix": "iid" if self._alpha is None else f"dirichlet({self._alpha:g})"}

    def _generate(self, cid: int) -> RawData:
        """Client ``cid``'s examples (a held-out client when cid >= num_clients), from (seed, cid)."""
        n = int(self._sizes_with_test()[cid])
        num_labels = len(self.label_names)
        rng = np.random.default_rng([self._seed, SYNTHETIC_CLIENT, cid])
        if self._alpha is None:
            mix = np.full(num_labels, 1.0 / num_labels)
        else:
            mix = rng.dirichlet(np.full(num_labels, self._alpha))
        labels = rng.choice(num_labels, size=n, p=mix).astype(np.int64)
        return RawData(labels=labels, label_names=list(self.label_names),
                       input_ids=synthetic_rows(labels, self._keys, self._synthetic, rng))
