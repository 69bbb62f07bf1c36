"""File sources with sentence pairs (data.text_pair_column) and numeric regression targets."""

import numpy as np
import pandas as pd
import pytest

from raysim.config import ConfigError, DataConfig
from raysim.data.sources import load_source
from raysim.data.tables import REGRESSION_BINS, load_table, quantile_bins

FIRST = ["a man plays a guitar", "a dog runs", "the sun is hot", "kids play football", "rain falls", "a cat sleeps",
         "two men talk", "a bird sings"]
SECOND = ["someone plays music", "a cat sleeps", "it is warm", "children play a game", "it is dry", "a cat naps",
          "people chat", "a plane flies"]
SCORES = [4.2, 0.5, 3.8, 4.0, 0.2, 4.9, 3.5, 1.0]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"sentence1": FIRST, "sentence2": SECOND, "label": SCORES,
                         "topic": ["x", "y"] * 4})


def _save(df: pd.DataFrame, kind: str, path) -> str:
    if kind == "csv":
        df.to_csv(path, index=False)
    elif kind == "parquet":
        df.to_parquet(path, index=False)
    elif kind == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        import datasets

        datasets.Dataset.from_pandas(df).save_to_disk(str(path))
    return f"{kind}:{path}"


def _data(source: str, **kw) -> DataConfig:
    return DataConfig(source=source, text_column="sentence1", text_pair_column="sentence2", **kw)


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl", "hf-disk"])
def test_pairs_and_numeric_targets_from_every_file_kind(tmp_path, kind):
    source = _save(_frame(), kind, tmp_path / f"d.{kind}")
    data = _data(source)
    kind_name, _, path = source.partition(":")
    raw = load_table(kind_name, path, data, regression=True)
    assert raw.texts == FIRST and raw.text_pairs == SECOND
    assert raw.targets.dtype == np.float32 and np.allclose(raw.targets, SCORES)
    assert "sentence2" not in raw.columns and "label" not in raw.columns
    assert list(raw.columns["topic"][:2]) == ["x", "y"]
    # labels are quantile bins of the scores: ordered like the scores, about equally full
    assert raw.num_labels == REGRESSION_BINS and raw.labels.dtype == np.int64
    order = np.argsort(raw.targets)
    assert np.all(np.diff(raw.labels[order]) >= 0)
    # classification of the same file: pairs too, labels are the distinct scores
    cls = load_source(data, seed=0)
    assert cls.text_pairs == SECOND and cls.targets is None and cls.num_labels == len(set(SCORES))


def test_pairs_survive_subsets_and_max_examples(tmp_path):
    source = _save(_frame().assign(label=[0, 1] * 4), "csv", tmp_path / "d.csv")
    raw = load_source(_data(source, max_examples=4), seed=0)
    assert len(raw) == 4 and all(SECOND[FIRST.index(a)] == b for a, b in zip(raw.texts, raw.text_pairs))


def test_missing_pair_column_names_the_key(tmp_path):
    path = tmp_path / "d.parquet"
    source = _save(_frame(), "parquet", path)
    with pytest.raises(ConfigError) as err:
        load_source(DataConfig(source=source, text_column="sentence1", text_pair_column="hypothesis"), seed=0)
    assert str(err.value) == (f"data.text_pair_column: column 'hypothesis' not in {path}; columns: "
                              "sentence1, sentence2, label, topic")
    with pytest.raises(ConfigError, match="^data.text_pair_column: .*causal_lm"):
        load_source(_data(source), seed=0, task="causal_lm")


@pytest.mark.parametrize("labels,match", [
    (["high", "low"] * 4, "needs numeric scores.*str values such as 'high'"),
    ([True, False] * 4, "needs numeric scores.*bool"),
    ([2.5] * 8, "a single score"),
])
def test_regression_needs_numeric_scores(tmp_path, labels, match):
    path = tmp_path / "d.parquet"
    _save(_frame().assign(label=labels), "parquet", path)
    with pytest.raises(ConfigError, match=f"^data.label_column: .*{match}"):
        load_table("parquet", str(path), _data(f"parquet:{path}"), regression=True)


def test_regression_missing_scores_name_the_label_column(tmp_path):
    path = tmp_path / "d.csv"
    _save(_frame().assign(label=[1.0, None] * 4), "csv", path)
    with pytest.raises(ConfigError, match="^data.label_column: .*4 missing values"):
        load_table("csv", str(path), _data(f"csv:{path}"), regression=True)


def test_quantile_bins_merge_repeated_scores():
    ids, names = quantile_bins(np.array([1, 1, 1, 1, 1, 1, 2, 3], dtype=np.float32), 5)
    # inner quintiles 1, 1, 1, 1.6: the four edges collapse to two, so three bins, the first one empty
    assert ids.tolist() == [0, 0, 0, 0, 0, 0, 1, 1] and names == ["1..1", "2..3"]
    ids, _ = quantile_bins(np.arange(100, dtype=np.float32), 5)
    assert np.bincount(ids).tolist() == [20] * 5


def test_the_federated_split_refuses_data_that_does_not_fit_the_task():
    from raysim.config import ExperimentConfig
    from raysim.data.federated import split_and_partition

    def cfg(task, **data):
        return ExperimentConfig.model_validate({
            "task": {"type": task}, "federation": {"num_clients": 4, "clients_per_round": 2},
            "data": {"source": "synthetic:text-cls", "partition": {"scheme": "iid"},
                     "synthetic": {"num_examples": 100, "seq_len": 16, "vocab_size": 200, "num_labels": 2}, **data}})

    reg = cfg("regression")
    with pytest.raises(ConfigError, match="^data.source: synthetic:text-cls has class labels, not numeric scores"):
        split_and_partition(load_source(reg.data, reg.seed), reg)
    pairs = cfg("seq_cls", text_pair_column="sentence2")
    with pytest.raises(ConfigError, match="^data.text_pair_column: data.source synthetic:text-cls has no sentence"):
        split_and_partition(load_source(pairs.data, pairs.seed), pairs)
