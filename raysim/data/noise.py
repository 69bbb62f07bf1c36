"""Label noise for data-quality experiments (`data.label_noise: {fraction_clients, flip_prob}`).

A seeded `fraction_clients` of the clients are "noisy": each of their TRAINING labels is flipped,
independently with probability `flip_prob`, to a uniformly random *other* class. The global test
split and every client's local test split keep their true labels. Client training index sets are
disjoint, so the noise is materialised as one modified copy of the label array in which only the
training rows of noisy clients differ; workers read labels from that copy.

Everything is a pure function of the config (seed, number of clients) and the partition, so the
noisy set is known before training (`raysim.ranks` uses it for `lora.rank: {scheme: by_quality}`)
and a resumed run flips exactly the same labels.
"""

from __future__ import annotations

import numpy as np

from raysim.seeds import LABEL_NOISE, derive_seed



def noisy_clients(cfg) -> np.ndarray:
    """Sorted int64 ids of the clients with label noise: round(fraction_clients·N) of a seeded permutation.

    Empty when `data.label_noise` is unset, its fraction is 0 or its flip probability is 0.
    """
    spec = cfg.data.label_noise
    n = cfg.federation.num_clients
    if spec is None or spec.fraction_clients <= 0 or spec.flip_prob <= 0:
        return np.zeros(0, dtype=np.int64)
    count = int(round(spec.fraction_clients * n))
    order = np.random.default_rng(derive_seed(cfg.seed, LABEL_NOISE)).permutation(n)
    return np.sort(order[:count]).astype(np.int64)


def flip_labels(labels: np.ndarray, idx: np.ndarray, flip_prob: float, num_labels: int,
                rng: np.random.Generator) -> np.ndarray:
    """Copy of `labels` whose rows `idx` are each flipped with probability `flip_prob` to another class."""
    out = np.array(labels, copy=True)
    idx = np.asarray(idx, dtype=np.int64)
    if num_labels < 2 or idx.size == 0:
        return out
    chosen = idx[rng.random(idx.size) < flip_prob]
    offsets = rng.integers(1, num_labels, size=chosen.size)          # 1 … K−1: never the same class
    out[chosen] = (out[chosen] + offsets) % num_labels
    return out


def apply_label_noise(labels: np.ndarray, client_train: list[np.ndarray], cfg,
                      num_labels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels with noisy training rows, noisy client ids).

    labels: (N,) true labels of all examples; client_train[k]: client k's training row indices
    (disjoint across clients). Only rows in client_train[k] of a noisy client k can change; the
    input array is never modified. Flips of client k come from the stream (seed, LABEL_NOISE, k).
    """
    labels = np.asarray(labels)
    noisy = noisy_clients(cfg)
    if noisy.size == 0:
        return labels, noisy
    k = int(num_labels) if num_labels is not None else int(labels.max()) + 1
    out = np.array(labels, copy=True)
    p = cfg.data.label_noise.flip_prob
    for cid in noisy:
        idx = np.asarray(client_train[int(cid)], dtype=np.int64)
        rng = np.random.default_rng(derive_seed(cfg.seed, LABEL_NOISE, int(cid)))
        out[idx] = flip_labels(labels[idx], np.arange(idx.size), p, k, rng)
    return out, noisy
