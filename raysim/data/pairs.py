"""Generated sentence-pair data: ``synthetic:text-pair`` (classification) and ``synthetic:regression``.

Both are already tokenized, laid out as a sentence pair ``[CLS] a [SEP] b [SEP]`` of ``seq_len``
tokens: ``content = seq_len - 3`` positions, the first sentence ``a`` gets ``content // 2`` of them
and ``b`` the rest. The vocabulary is ``data.synthetic.vocab_size`` token ids: 0-3 are the special
tokens, a few "key tokens" per key class carry the signal, everything else is neutral filler.

- ``synthetic:text-pair``: ``num_labels`` key classes plus two distractor-only classes. Example with
  label y: each sentence holds ``k`` key tokens of class y and ``k`` of its own distractor class
  (``d_a != d_b``, both != y). The label is the class the two sentences SHARE: each sentence alone
  holds two classes equally often, so neither half determines the label (a pair relation, like
  paraphrase detection), while "the class present in both halves" classifies every example.
  ``k = max(1, round(key_fraction * len(a) / 2))``.
- ``synthetic:regression``: one key class; an example holds ``c`` key tokens, ``c`` uniform in
  ``0..2m`` (``m = max(1, round(key_fraction * len(a)))``), at random positions of both sentences.
  The score is ``5 * c / (2m)`` in [0, 5] (STS-B's range) as float32 ``targets``; ``labels`` are
  ``num_labels`` equal-width score bins, so stratified splits and label partitions still work.

Randomness: ``np.random.default_rng([seed, SYNTHETIC, offset])``, one offset per source.
"""

from __future__ import annotations

import numpy as np

from raysim.config import ConfigError, SyntheticConfig
from raysim.data.raw import CLS_ID, NUM_SPECIAL_TOKENS, SEP_ID, RawData
from raysim.data.raw import KEY_TOKENS_PER_CLASS
from raysim.seeds import SYNTHETIC

MAX_SCORE = 5.0
_OFFSETS = {"synthetic:text-pair": 1, "synthetic:regression": 2}
_TASKS = {"synthetic:text-pair": "seq_cls", "synthetic:regression": "regression"}


def make_pairs(source: str, cfg: SyntheticConfig, seed: int, task: str) -> RawData:
    """The generated pair data of ``source`` (``synthetic:text-pair`` or ``synthetic:regression``).

    Returns:
        RawData with ``input_ids`` (N, seq_len) int64 and ``labels`` (N,) int64; for regression also
        ``targets`` (N,) float32 in [0, 5].

    Raises:
        ConfigError: the source does not fit ``task``, ``seq_len`` below 5, a vocabulary too small
            for the key classes.
    """
    want = _TASKS[source]
    if task != want:
        raise ConfigError(f"data.source: {source} generates {'scores' if want == 'regression' else 'classes'}; "
                          f"it needs task.type: {want} (task.type is {task})")
    if cfg.seq_len < 5:
        raise ConfigError(f"data.synthetic.seq_len: {source} needs at least 5 tokens per example "
                          f"([CLS] a [SEP] b [SEP]); got {cfg.seq_len}")
    rng = np.random.default_rng([seed, SYNTHETIC, _OFFSETS[source]])
    if source == "synthetic:text-pair":
        return _text_pair(cfg, rng)
    return _regression(cfg, rng)


def pair_layout(seq_len: int) -> tuple[int, int]:
    """(tokens of sentence a, tokens of sentence b) in a ``seq_len`` pair ``[CLS] a [SEP] b [SEP]``."""
    content = seq_len - 3
    return content // 2, content - content // 2


def key_classes(cfg: SyntheticConfig, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(key tokens (num_classes, k) int64, disjoint; filler tokens (F,) int64, nobody's key token).

    ``k = min(8, (vocab_size - 4) // (2 * num_classes))``, so at least half of the non-special
    vocabulary stays filler.
    """
    usable = cfg.vocab_size - NUM_SPECIAL_TOKENS
    k = min(KEY_TOKENS_PER_CLASS, usable // (2 * num_classes))
    if k < 1:
        raise ConfigError(f"data.synthetic.vocab_size: {cfg.vocab_size} is too small for {num_classes} key "
                          f"classes; need at least {2 * num_classes + NUM_SPECIAL_TOKENS}")
    tokens = rng.permutation(np.arange(NUM_SPECIAL_TOKENS, cfg.vocab_size))
    return tokens[:num_classes * k].reshape(num_classes, k).astype(np.int64), np.sort(tokens[num_classes * k:])


def _text_pair(cfg: SyntheticConfig, rng: np.random.Generator) -> RawData:
    n, num_labels = cfg.num_examples, cfg.num_labels
    keys, filler = key_classes(cfg, num_labels + 2, rng)
    len_a, len_b = pair_layout(cfg.seq_len)
    k = max(1, int(round(cfg.key_fraction * len_a / 2)))
    if 2 * k > len_a:
        k = len_a // 2
    if k < 1:
        raise ConfigError(f"data.synthetic.seq_len: {cfg.seq_len} leaves no room for key tokens of two classes "
                          "per sentence; use at least 7")
    labels = rng.integers(0, num_labels, size=n)
    # two distinct distractor classes per example, both different from the label
    others = np.argsort(rng.random((n, num_labels + 2)) + (np.arange(num_labels + 2) == labels[:, None]), axis=1)
    halves = []
    for length, distractor in ((len_a, others[:, 0]), (len_b, others[:, 1])):
        classes = np.concatenate([np.repeat(labels[:, None], k, axis=1), np.repeat(distractor[:, None], k, axis=1)],
                                 axis=1)                                                   # (n, 2k)
        halves.append(_fill(rng, keys, filler, classes, length))
    return RawData(labels=labels.astype(np.int64), label_names=[f"class_{i}" for i in range(num_labels)],
                   input_ids=_join(*halves))


def _regression(cfg: SyntheticConfig, rng: np.random.Generator) -> RawData:
    n = cfg.num_examples
    keys, filler = key_classes(cfg, 1, rng)
    len_a, len_b = pair_layout(cfg.seq_len)
    m = min(max(1, int(round(cfg.key_fraction * len_a))), (len_a + len_b) // 2)
    counts = rng.integers(0, 2 * m + 1, size=n)
    # a random permutation rank per content position; the `count` lowest ranks hold key tokens
    ranks = np.argsort(np.argsort(rng.random((n, len_a + len_b)), axis=1), axis=1)
    is_key = ranks < counts[:, None]
    body = np.where(is_key, keys[0][rng.integers(0, keys.shape[1], size=is_key.shape)],
                    rng.choice(filler, size=is_key.shape))
    targets = (MAX_SCORE * counts / (2 * m)).astype(np.float32)
    labels, names = score_bins(targets, cfg.num_labels)
    return RawData(labels=labels, label_names=names, input_ids=_join(body[:, :len_a], body[:, len_a:]),
                   targets=targets)


def score_bins(targets: np.ndarray, num_bins: int) -> tuple[np.ndarray, list[str]]:
    """Equal-width bins of [0, 5]: ((N,) int64 bin ids, bin names)."""
    edges = np.linspace(0.0, MAX_SCORE, num_bins + 1)
    ids = np.clip(np.searchsorted(edges, targets, side="right") - 1, 0, num_bins - 1).astype(np.int64)
    return ids, [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]


def _fill(rng: np.random.Generator, keys: np.ndarray, filler: np.ndarray, classes: np.ndarray,
          length: int) -> np.ndarray:
    """(n, length) sentences: filler tokens, with one random key token of ``classes[:, j]`` at ``2k``
    random distinct positions (``classes`` is (n, 2k))."""
    n, slots = classes.shape
    body = rng.choice(filler, size=(n, length))
    positions = np.argsort(rng.random((n, length)), axis=1)[:, :slots]              # distinct per row
    tokens = keys[classes, rng.integers(0, keys.shape[1], size=classes.shape)]
    np.put_along_axis(body, positions, tokens, axis=1)
    return body


def _join(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[CLS] a [SEP] b [SEP]`` rows, int64."""
    n = len(a)
    cls, sep = np.full((n, 1), CLS_ID), np.full((n, 1), SEP_ID)
    return np.concatenate([cls, a, sep, b, sep], axis=1).astype(np.int64)
