"""``parquet-dataset:DIR``: a folder of Parquet files whose ``data.client_column`` names each row's client.

Opening scans only the client column (and the label column), batch by batch, so memory stays
proportional to the number of clients; a client's rows are read later with a filter on the client column.
See `raysim.data.per_client` for the rules (skipped small clients, held-out test clients, columns).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raysim.data.client_source import PARQUET_DATASET, PerClientData
from raysim.data.raw import RawData, encode_labels
from raysim.data.tables import _causal_table, _strings
from raysim.errors import ConfigError
from raysim.seeds import CLIENT_CHOICE

MERGE_ROWS = 1 << 22          # partial client counts are merged once they hold this many rows


class ParquetClients(PerClientData):
    """The clients of a Parquet dataset; holds the chosen client values and sizes, never example data."""

    _transient = ("_dataset",)

    def __init__(self, cfg) -> None:
        data = cfg.data
        self._root = _resolve(data.source[len(PARQUET_DATASET):])
        self._data = data
        self._task = cfg.task.type
        self._dataset: pads.Dataset | None = None
        names = self._open().schema.names
        self._label_column = _check_columns(data, self._task, self._root, names)
        values, counts, facts = _count_clients(self._open(), data.client_column, self._root)
        self._labels = _Vocabulary.scan(self._open(), self._label_column, self._task, self._root)
        self.label_names = self._labels.names
        train, test = _choose_clients(counts, cfg)
        self.num_clients = len(train)
        self._train_values, self._sizes = values.take(train), counts[train]
        self._test_values = values.take(test)
        eligible = int(np.count_nonzero(counts >= data.partition.min_samples))
        self._facts = {"source": data.source, "clients": self.num_clients, "held_out_clients": len(test),
                       "test_examples": int(counts[test].sum()), **facts,
                       "skipped_clients": len(counts) - eligible,
                       "unused_clients": eligible - len(train) - len(test)}

    def sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def client(self, cid: int) -> RawData:
        value = self._train_values[self._check_id(cid)]
        return self._read(pc.field(self._data.client_column) == value)

    def test_set(self) -> RawData:
        return self._read(pc.field(self._data.client_column).isin(self._test_values))

    def describe(self) -> dict:
        return dict(self._facts)

    def _open(self) -> pads.Dataset:
        """The pyarrow dataset (cached on this instance; left out of the pickle)."""
        if self._dataset is None:
            self._dataset = _open_dataset(self._root)
        return self._dataset

    def _read(self, where: pc.Expression) -> RawData:
        """The rows matching ``where``, in the files' row order, as RawData with global label ids."""
        data = self._data
        if self._task == "causal_lm":
            text = [c for c in (data.prompt_column, data.response_column) if c is not None] or [data.text_column]
        else:
            text = [c for c in (data.text_column, data.text_pair_column) if c is not None]
        label = [self._label_column] if self._label_column is not None else []
        table = self._open().to_table(columns=text + label, filter=where)
        labels = self._labels.ids(table.column(self._label_column) if label else None, table.num_rows)
        if self._task == "causal_lm":
            raw = _causal_table(Path(self._root), text, lambda c: table.column(c).to_pylist(), data)
            return dataclasses.replace(raw, labels=labels, label_names=list(self.label_names))
        pairs = None if data.text_pair_column is None else _column_strings(table, data.text_pair_column)
        return RawData(labels=labels, label_names=list(self.label_names),
                       texts=_column_strings(table, data.text_column), text_pairs=pairs)


@dataclasses.dataclass
class _Vocabulary:
    """The global label vocabulary: label value ``values[i]`` has id ``value_ids[i]``; missing labels
    (causal data only) have ``missing_id``; no label column: every id is 0, named ``all``."""

    names: list[str]
    values: pa.Array | None = None
    value_ids: np.ndarray | None = None
    missing_id: int = 0

    @classmethod
    def scan(cls, dataset: pads.Dataset, column: str | None, task: str, root: str) -> "_Vocabulary":
        """Read the label column once and build the names with `encode_labels` (sorted order)."""
        if column is None:
            return cls(names=["all"])
        uniques, missing = [], 0
        for batch in dataset.to_batches(columns=[column]):
            uniques.append(pc.unique(_plain(batch.column(0))))
            missing += batch.column(0).null_count
        value_type = _plain(pa.array([], type=dataset.schema.field(column).type)).type
        values = pc.drop_null(pc.unique(pa.chunked_array(uniques, type=value_type)))
        if task == "seq_cls" and missing:
            raise ConfigError(f"data.label_column: column {column!r} in {root} has {missing} missing values")
        listed = values.to_pylist() + ([""] if missing else [])    # causal data: missing labels group as ""
        ids, names = encode_labels(listed)
        if task == "seq_cls" and len(names) < 2:
            raise ConfigError(f"data.label_column: column {column!r} in {root} has only {len(names)} "
                              f"distinct label ({', '.join(names) or 'none'}); need at least 2")
        return cls(names=names, values=values, value_ids=ids[:len(values)],
                   missing_id=int(ids[-1]) if missing else 0)

    def ids(self, column: pa.ChunkedArray | None, n: int) -> np.ndarray:
        """(n,) int64 global label ids of the label values ``column`` (None: no label column)."""
        if column is None:
            return np.zeros(n, dtype=np.int64)
        pos = pc.fill_null(pc.index_in(_plain(column), value_set=self.values), -1).to_numpy()
        return np.where(pos >= 0, self.value_ids[np.maximum(pos, 0)], self.missing_id).astype(np.int64)


def _column_strings(table: pa.Table, column: str) -> list[str]:
    return _strings(table.column(column).to_pylist())


def _plain(values):
    """``values`` (an Array or ChunkedArray) with a dictionary type (pandas categoricals) decoded."""
    return pc.cast(values, values.type.value_type) if pa.types.is_dictionary(values.type) else values


def _resolve(path_str: str) -> str:
    path = Path(path_str).expanduser()
    return str(path if path.is_absolute() else Path.cwd() / path)


def _open_dataset(root: str) -> pads.Dataset:
    """The Parquet files under ``root`` (hive partitions become columns); ConfigError if there are none."""
    if not Path(root).is_dir():
        raise ConfigError(f"data.source: parquet-dataset folder not found: {root}")
    try:
        dataset = pads.dataset(root, format="parquet", partitioning="hive")
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"data.source: could not read {root} as Parquet files ({type(exc).__name__}: "
                          f"{exc})") from None
    if not dataset.files:
        raise ConfigError(f"data.source: no Parquet files in {root}")
    return dataset


def _check_columns(data, task: str, root: str, names: list[str]) -> str | None:
    """ConfigError for a missing column; returns the label column to read (None: none)."""
    found = ", ".join(names)
    if data.client_column is None:
        raise ConfigError(f"data.client_column: required for parquet-dataset sources (the column naming each "
                          f"row's client); columns: {found}")
    wanted = [("data.client_column", data.client_column)]
    if task == "seq_cls":
        wanted += [("data.text_column", data.text_column), ("data.label_column", data.label_column)]
        if data.text_pair_column is not None:
            wanted.append(("data.text_pair_column", data.text_pair_column))
    elif task != "causal_lm":
        raise ConfigError(f"task.type: parquet-dataset sources support seq_cls and causal_lm (got {task})")
    for key, col in wanted:
        if col not in names:
            raise ConfigError(f"{key}: column {col!r} not found in {root}; columns: {found}")
    if task == "causal_lm":
        if data.text_pair_column is not None:
            raise ConfigError("data.text_pair_column: sentence pairs are for task.type seq_cls or regression "
                              "(task.type is causal_lm)")
        # the table reader's own column checks (prompt/response pairing, names) on a one-row stand-in
        _causal_table(Path(root), names, lambda c: [""], data)
        return data.label_column if data.label_column in names else None
    return data.label_column


def _count_clients(dataset: pads.Dataset, column: str, root: str) -> tuple[pa.Array, np.ndarray, dict]:
    """(client values sorted, (D,) int64 rows of each, facts) from one scan of the client column."""
    partial: list[pa.Table] = []
    pending = total = 0
    for batch in dataset.to_batches(columns=[column]):
        counts = pc.value_counts(_plain(batch.column(0)))
        partial.append(pa.table({"value": counts.field("values"), "rows": counts.field("counts")}))
        pending, total = pending + len(counts), total + batch.num_rows
        if pending > MERGE_ROWS:
            partial, pending = [_merge_counts(partial)], 0
    if total == 0:
        raise ConfigError(f"data.source: {root} has no rows")
    merged = _merge_counts(partial)
    no_client = pc.is_null(merged.column("value"))
    rows_without = int(pc.sum(pc.filter(merged.column("rows"), no_client)).as_py() or 0)
    merged = merged.filter(pc.invert(no_client))
    merged = merged.take(pc.sort_indices(merged, sort_keys=[("value", "ascending")]))
    if merged.num_rows == 0:
        raise ConfigError(f"data.client_column: column {column!r} in {root} holds no values")
    facts = {"dataset_clients": merged.num_rows, "rows_without_client": rows_without}
    return merged.column("value").combine_chunks(), merged.column("rows").to_numpy().astype(np.int64), facts


def _merge_counts(parts: list[pa.Table]) -> pa.Table:
    summed = pa.concat_tables(parts).group_by("value").aggregate([("rows", "sum")])
    return pa.table({"value": summed.column("value"), "rows": summed.column("rows_sum")})


def _choose_clients(counts: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(training client positions, held-out client positions), both sorted, among the clients with
    at least ``data.partition.min_samples`` rows; seeded by (seed, CLIENT_CHOICE)."""
    min_samples, held_out = cfg.data.partition.min_samples, cfg.data.test_clients
    wanted = cfg.federation.num_clients
    eligible = np.flatnonzero(counts >= min_samples)
    have = len(eligible)
    if held_out >= have:
        raise ConfigError(f"data.test_clients: the dataset has {have} clients with ≥ {min_samples} examples; "
                          f"holding out {held_out} leaves none for training")
    if wanted > have - held_out:
        raise ConfigError(f"federation.num_clients: the dataset has {have} clients with ≥ {min_samples} "
                          f"examples; data.test_clients holds out {held_out}, so at most {have - held_out}")
    order = np.random.default_rng([cfg.seed, CLIENT_CHOICE]).permutation(eligible)
    return np.sort(order[held_out:held_out + wanted]), np.sort(order[:held_out])
