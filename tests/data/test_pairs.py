"""The generated sentence-pair sources: layout, determinism, and a label that needs both sentences."""

import numpy as np
import pytest

from raysim.config import ConfigError, DataConfig, SyntheticConfig
from raysim.data.pairs import key_classes, make_pairs, pair_layout
from raysim.data.raw import CLS_ID, NUM_SPECIAL_TOKENS, SEP_ID
from raysim.data.sources import load_source
from raysim.seeds import SYNTHETIC

CFG = SyntheticConfig(num_examples=600, seq_len=32, vocab_size=200, num_labels=3, key_fraction=0.5)


def _halves(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    len_a, _ = pair_layout(seq_len)
    return ids[:, 1:1 + len_a], ids[:, 2 + len_a:-1]


def _class_counts(half: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(n, classes): how many key tokens of each class a sentence holds."""
    return np.stack([np.isin(half, row).sum(axis=1) for row in keys], axis=1)


@pytest.mark.parametrize("source,task", [("synthetic:text-pair", "seq_cls"), ("synthetic:regression", "regression")])
def test_layout_and_determinism(source, task):
    raw = make_pairs(source, CFG, seed=3, task=task)
    again = make_pairs(source, CFG, seed=3, task=task)
    other = make_pairs(source, CFG, seed=4, task=task)
    ids = raw.input_ids
    len_a, len_b = pair_layout(32)
    assert ids.shape == (600, 32) and ids.dtype == np.int64 and len_a + len_b == 29
    assert np.all(ids[:, 0] == CLS_ID) and np.all(ids[:, 1 + len_a] == SEP_ID) and np.all(ids[:, -1] == SEP_ID)
    a, b = _halves(ids, 32)
    assert a.min() >= NUM_SPECIAL_TOKENS and b.min() >= NUM_SPECIAL_TOKENS and ids.max() < 200
    assert np.array_equal(ids, again.input_ids) and np.array_equal(raw.labels, again.labels)
    assert not np.array_equal(ids, other.input_ids)
    assert raw.labels.dtype == np.int64 and set(np.unique(raw.labels)) == set(range(3))


def test_text_pair_label_is_the_class_both_sentences_share():
    raw = make_pairs("synthetic:text-pair", CFG, seed=0, task="seq_cls")
    keys, _ = key_classes(CFG, CFG.num_labels + 2, np.random.default_rng([0, SYNTHETIC, 1]))
    a, b = _halves(raw.input_ids, 32)
    in_a, in_b = _class_counts(a, keys), _class_counts(b, keys)
    # the rule "the class present in both sentences" classifies every example
    assert np.array_equal(np.argmax(np.minimum(in_a, in_b), axis=1), raw.labels)
    # each sentence alone holds exactly two classes, equally often: it cannot tell which one is the label
    for half in (in_a, in_b):
        assert np.all((half > 0).sum(axis=1) == 2)
        present = np.sort(half, axis=1)[:, -2:]
        assert np.all(present[:, 0] == present[:, 1])
    assert raw.label_names == ["class_0", "class_1", "class_2"] and raw.targets is None


def test_regression_score_is_the_share_of_key_tokens():
    raw = make_pairs("synthetic:regression", CFG, seed=0, task="regression")
    keys, _ = key_classes(CFG, 1, np.random.default_rng([0, SYNTHETIC, 2]))
    counts = np.isin(raw.input_ids, keys[0]).sum(axis=1)
    assert raw.targets.dtype == np.float32 and raw.targets.min() == 0.0 and raw.targets.max() == 5.0
    assert np.corrcoef(counts, raw.targets)[0, 1] == pytest.approx(1.0)           # an exact linear function
    assert len(np.unique(raw.targets)) > 5
    # labels are equal-width bins of the score, for stratified splits
    assert raw.num_labels == 3 and np.array_equal(raw.labels, np.minimum((raw.targets / 5 * 3).astype(int), 2))


def test_load_source_dispatches_and_keeps_targets_with_max_examples():
    data = DataConfig(source="synthetic:regression", synthetic=CFG, max_examples=100)
    raw = load_source(data, seed=0, task="regression")
    assert len(raw) == 100 and raw.targets.shape == (100,)
    full = make_pairs("synthetic:regression", CFG, seed=0, task="regression")
    rows = [np.flatnonzero((full.input_ids == r).all(axis=1))[0] for r in raw.input_ids[:5]]
    assert np.array_equal(full.targets[rows], raw.targets[:5])


@pytest.mark.parametrize("source,task", [("synthetic:text-pair", "regression"), ("synthetic:regression", "seq_cls"),
                                         ("synthetic:text-pair", "causal_lm")])
def test_source_must_fit_the_task(source, task):
    with pytest.raises(ConfigError, match="^data.source: .*needs task.type"):
        make_pairs(source, CFG, seed=0, task=task)


def test_too_short_or_too_small_vocabulary():
    with pytest.raises(ConfigError, match="^data.synthetic.seq_len"):
        make_pairs("synthetic:regression", CFG.model_copy(update={"seq_len": 4}), seed=0, task="regression")
    with pytest.raises(ConfigError, match="^data.synthetic.seq_len"):
        make_pairs("synthetic:text-pair", CFG.model_copy(update={"seq_len": 6}), seed=0, task="seq_cls")
    with pytest.raises(ConfigError, match="^data.synthetic.vocab_size"):
        make_pairs("synthetic:text-pair", CFG.model_copy(update={"vocab_size": 16, "num_labels": 5}), seed=0,
                   task="seq_cls")
    raw = make_pairs("synthetic:text-pair", CFG.model_copy(update={"seq_len": 7}), seed=0, task="seq_cls")
    assert raw.input_ids.shape == (600, 7)
