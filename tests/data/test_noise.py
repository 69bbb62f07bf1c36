"""Label noise (raysim.data.noise): only training labels of the chosen clients change."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.data.federated import split_and_partition
from raysim.data.noise import apply_label_noise, flip_labels, noisy_clients
from raysim.data.sources import load_source


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = tiny_config(**{"data.label_noise": "{fraction_clients: 0.5, flip_prob: 0.3}",
                         "data.synthetic.num_examples": 4000})
    raw = load_source(cfg.data, cfg.seed)
    test_idx, train, local_test = split_and_partition(raw, cfg)
    return cfg, np.asarray(raw.labels), test_idx, train, local_test


def test_only_train_labels_of_noisy_clients_change_at_about_flip_prob(setup):
    cfg, labels, test_idx, train, local_test = setup
    original = labels.copy()
    noisy_labels, noisy = apply_label_noise(labels, train, cfg, num_labels=4)
    assert np.array_equal(labels, original)                               # input untouched
    assert len(noisy) == 4 and np.array_equal(noisy, noisy_clients(cfg))
    changed = np.flatnonzero(noisy_labels != labels)
    noisy_rows = np.concatenate([train[c] for c in noisy])
    assert set(changed) <= set(noisy_rows.tolist())
    assert np.array_equal(noisy_labels[test_idx], labels[test_idx])       # global test split: true labels
    for c in range(cfg.federation.num_clients):
        assert np.array_equal(noisy_labels[local_test[c]], labels[local_test[c]])
        if c not in noisy:
            assert np.array_equal(noisy_labels[train[c]], labels[train[c]])
    rate = len(changed) / len(noisy_rows)
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(noisy_rows))     # binomial, 4 sigma
    assert noisy_labels.min() >= 0 and noisy_labels.max() < 4


def test_noise_is_seeded_and_absent_without_config(setup, tiny_config):
    cfg, labels, _, train, _ = setup
    a, _ = apply_label_noise(labels, train, cfg, 4)
    b, _ = apply_label_noise(labels, train, cfg, 4)
    assert np.array_equal(a, b)
    clean, none = apply_label_noise(labels, train, tiny_config(), 4)
    assert none.size == 0 and np.array_equal(clean, labels)


def test_flips_always_go_to_another_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=5000)
    out = flip_labels(labels, np.arange(5000), 1.0, 5, rng)
    assert (out != labels).all()
    counts = np.bincount((out - labels) % 5, minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 1000                      # uniform over the other 4 classes
