"""Read ``parquet:``, ``csv:``, ``jsonl:`` and ``hf-disk:`` sources into RawData.

- Classification: ``data.text_column`` and ``data.label_column`` (at least 2 distinct labels), and
  ``data.text_pair_column`` (the second sentence of a pair) when it is set.
- ``task.type: regression``: the same columns, but ``data.label_column`` must hold numbers (at least
  2 distinct); they become float32 ``targets``, and ``labels`` are ``REGRESSION_BINS`` quantile bins
  of them (fewer when there are fewer distinct values), for stratified splits and label partitions.
- ``task.type: causal_lm``: ``data.prompt_column`` + ``data.response_column`` (instruction data), or
  ``data.text_column`` alone (plain language modelling: empty prompts, the text as the response).
  ``data.label_column`` is optional: when the file has it, it groups the examples (stratified test
  split); otherwise every label is 0, named ``all``.

Every other column whose values are all scalars (strings, numbers, booleans, missing) of at most
``MAX_COLUMN_CHARS`` characters is kept in ``RawData.columns`` as strings (missing values become
``""``), so ``data.partition: {scheme: by_column}`` and ``eval.group_by`` can use it; long free-text
columns (a Dolly ``context``) are left out, since fixed-width string arrays would cost N x the longest
value. For causal data that includes ``data.label_column``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raysim.config import ConfigError, DataConfig
from raysim.data.raw import RawData, encode_labels

_SCALARS = (str, int, float, bool, np.generic)
MAX_COLUMN_CHARS = 256
REGRESSION_BINS = 5


def load_table(kind: str, path_str: str, data: DataConfig, causal: bool = False, *,
               regression: bool = False) -> RawData:
    """Read one table (``kind`` in parquet, csv, jsonl, hf-disk) as classification, regression
    (``regression=True``: numeric targets) or causal data."""
    path = Path(path_str).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.exists():
        raise ConfigError(f"data.source: file not found: {path}")
    columns, get_column = open_table(kind, path)
    if causal:
        if data.text_pair_column is not None:
            raise ConfigError("data.text_pair_column: sentence pairs are for task.type seq_cls or regression "
                              "(task.type is causal_lm)")
        return _causal_table(path, columns, get_column, data)
    return _classification_table(path, columns, get_column, data, regression)


def _classification_table(path: Path, columns: list[str], get_column: Callable, data: DataConfig,
                          regression: bool) -> RawData:
    wanted = [("data.text_column", data.text_column), ("data.label_column", data.label_column)]
    if data.text_pair_column is not None:
        wanted.append(("data.text_pair_column", data.text_pair_column))
    for key, col in wanted:
        if col not in columns:
            raise ConfigError(f"{key}: column {col!r} not in {path}; columns: {', '.join(map(str, columns))}")

    label_column = data.label_column
    raw_labels = list(get_column(label_column))
    if not raw_labels:
        raise ConfigError(f"data.source: {path} has no rows")
    missing = sum(_is_missing(v) for v in raw_labels)
    if missing:
        raise ConfigError(f"data.label_column: column {label_column!r} in {path} has {missing} "
                          "missing values")
    targets = None
    if regression:
        targets = numeric_targets(raw_labels, f"column {label_column!r} in {path}")
        labels, label_names = quantile_bins(targets, REGRESSION_BINS)
    else:
        labels, label_names = encode_labels(raw_labels)
        if len(label_names) < 2:
            raise ConfigError(f"data.label_column: column {label_column!r} in {path} has only "
                              f"{len(label_names)} distinct label ({label_names[0]!r}); need at least 2")
    texts = _strings(get_column(data.text_column))
    pairs = None if data.text_pair_column is None else _strings(get_column(data.text_pair_column))
    extra = scalar_columns(columns, get_column, exclude={col for _, col in wanted})
    return RawData(labels=labels, label_names=label_names, texts=texts, columns=extra, text_pairs=pairs,
                   targets=targets)


def numeric_targets(values: list[Any], where: str) -> np.ndarray:
    """(N,) float32 regression targets; ConfigError naming ``data.label_column`` for values that are
    not finite numbers (booleans and strings included) or fewer than 2 distinct values."""
    bad = next((v for v in values if isinstance(v, (bool, np.bool_))
                or not isinstance(v, (int, float, np.integer, np.floating))), None)
    if bad is not None:
        raise ConfigError(f"data.label_column: task.type regression needs numeric scores, but {where} holds "
                          f"{type(bad).__name__} values such as {bad!r}")
    targets = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(targets)):
        raise ConfigError(f"data.label_column: {where} holds non-finite scores (inf)")
    if len(np.unique(targets)) < 2:
        raise ConfigError(f"data.label_column: {where} holds a single score ({targets[0]:g}); regression "
                          "needs at least 2 distinct values")
    return targets.astype(np.float32)


def quantile_bins(targets: np.ndarray, num_bins: int) -> tuple[np.ndarray, list[str]]:
    """((N,) int64 ids of up to ``num_bins`` quantile bins of ``targets``, bin names "lo..hi").

    Bin edges are the inner quantiles; repeated edges (many equal scores) merge bins, and only
    non-empty bins are kept, numbered in order of their scores.
    """
    edges = np.unique(np.quantile(targets, np.linspace(0, 1, num_bins + 1)[1:-1]))
    uniq, ids = np.unique(np.searchsorted(edges, targets, side="right"), return_inverse=True)
    names = [f"{targets[ids == i].min():g}..{targets[ids == i].max():g}" for i in range(len(uniq))]
    return ids.astype(np.int64), names


def _causal_table(path: Path, columns: list[str], get_column: Callable, data: DataConfig) -> RawData:
    if (data.prompt_column is None) != (data.response_column is None):
        have, need = (("data.prompt_column", "data.response_column") if data.prompt_column is not None
                      else ("data.response_column", "data.prompt_column"))
        raise ConfigError(f"{need}: must be set together with {have} (or set neither and use "
                          "data.text_column for plain language modelling)")
    if data.prompt_column is not None:
        wanted = [("data.prompt_column", data.prompt_column), ("data.response_column", data.response_column)]
    else:
        wanted = [("data.text_column", data.text_column)]
    for key, col in wanted:
        if col not in columns:
            raise ConfigError(f"{key}: column {col!r} not found in {path}; columns: "
                              f"{', '.join(map(str, columns))}")

    responses = _strings(get_column(wanted[-1][1]))
    if not responses:
        raise ConfigError(f"data.source: {path} has no rows")
    prompts = _strings(get_column(wanted[0][1])) if len(wanted) == 2 else [""] * len(responses)
    if data.label_column in columns:
        values = get_column(data.label_column)
        labels, label_names = encode_labels(["" if _is_missing(v) else v for v in values])
    else:
        labels, label_names = np.zeros(len(responses), dtype=np.int64), ["all"]
    extra = scalar_columns(columns, get_column, exclude={col for _, col in wanted})
    return RawData(labels=labels, label_names=label_names, prompts=prompts, responses=responses, columns=extra)


def scalar_columns(columns: list[str], get_column: Callable, exclude: set[str]) -> dict[str, np.ndarray]:
    """Every column not in ``exclude`` of short scalar values, as (N,) numpy arrays of str."""
    out: dict[str, np.ndarray] = {}
    for name in columns:
        if name in exclude:
            continue
        values = list(get_column(name))
        if not all(_is_missing(v) or isinstance(v, _SCALARS) for v in values):
            continue
        strings = _strings(values)
        if max((len(v) for v in strings), default=0) <= MAX_COLUMN_CHARS:
            out[str(name)] = np.asarray(strings, dtype=str)
    return out


def open_table(kind: str, path: Path) -> tuple[list[str], Callable[[str], Any]]:
    """(column names, function column name -> sequence of values) for one file or folder."""
    if kind == "hf-disk":
        return _open_hf_disk(path)

    import pandas as pd

    readers = {
        "parquet": pd.read_parquet,
        "csv": pd.read_csv,
        "jsonl": lambda p: pd.read_json(p, lines=True),
    }
    try:
        df = readers[kind](path)
    except Exception as exc:  # noqa: BLE001 - any read failure is a data problem
        if kind == "csv" and type(exc).__name__ == "EmptyDataError":
            raise ConfigError(f"data.source: {path} has no rows") from None
        raise ConfigError(f"data.source: could not read {path} as {kind} ({type(exc).__name__}: {exc})") from None
    return [str(c) for c in df.columns], lambda col: df[col].tolist()


def _open_hf_disk(path: Path) -> tuple[list[str], Callable[[str], Any]]:
    try:
        import datasets
    except ImportError as exc:  # e.g. the GPU machine ships without `datasets`
        raise ConfigError(f"data.source: hf-disk:{path} needs the `datasets` package ({exc})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any read failure is a data problem
        raise ConfigError(f"data.source: could not read {path} with datasets.load_from_disk "
                          f"({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data.source: {path} is a DatasetDict without a 'train' split; "
                              f"splits: {', '.join(ds.keys())}")
        ds = ds["train"]
    return list(ds.column_names), lambda col: ds[col]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _strings(values) -> list[str]:
    return ["" if _is_missing(v) else str(v) for v in values]
