"""File sources for causal_lm (prompt/response or text columns), extra columns and RawData.subset."""

import numpy as np
import pandas as pd
import pytest

from raysim.config import ConfigError, DataConfig
from raysim.data.sources import RawData, load_source
from .test_sources import _write

PROMPTS = ["What is 2+2?", "Name a colour.", "Say hi.", "Capital of France?"]
RESPONSES = ["4", "blue", "hi", "Paris"]
CATEGORIES = ["math", "open", "open", "geo"]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"instruction": PROMPTS, "output": RESPONSES, "category": CATEGORIES,
                         "score": [1.5, None, 3.0, 4.0]})


def _causal(path, kind="jsonl", **kwargs) -> DataConfig:
    kwargs.setdefault("prompt_column", "instruction")
    kwargs.setdefault("response_column", "output")
    return DataConfig(source=f"{kind}:{path}", **kwargs)


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_prompt_response_columns_and_extra_columns(tmp_path, kind):
    path = tmp_path / f"d.{kind}"
    _write(_frame(), kind, path)
    raw = load_source(_causal(path, kind), seed=0, task="causal_lm")
    assert raw.prompts == PROMPTS and raw.responses == RESPONSES and raw.texts is None
    assert raw.label_names == ["all"] and raw.labels.tolist() == [0, 0, 0, 0]   # no label column
    assert sorted(raw.columns) == ["category", "score"]
    assert raw.columns["category"].tolist() == CATEGORIES
    assert raw.columns["score"].tolist() == ["1.5", "", "3.0", "4.0"]           # missing -> ""


def test_label_column_groups_causal_examples(tmp_path):
    path = tmp_path / "d.jsonl"
    _write(_frame().rename(columns={"category": "label"}), "jsonl", path)
    raw = load_source(_causal(path), seed=0, task="causal_lm")
    assert raw.label_names == ["geo", "math", "open"] and raw.labels.tolist() == [1, 2, 2, 0]


def test_missing_response_column_names_the_key(tmp_path):
    path = tmp_path / "d.jsonl"
    _write(_frame().drop(columns=["output"]), "jsonl", path)
    with pytest.raises(ConfigError) as err:
        load_source(_causal(path), seed=0, task="causal_lm")
    assert str(err.value) == (f"data.response_column: column 'output' not found in {path}; "
                              "columns: instruction, category, score")


def test_prompt_without_response_column_and_seq_cls_rejected(tmp_path):
    path = tmp_path / "d.jsonl"
    _write(_frame(), "jsonl", path)
    with pytest.raises(ConfigError, match=r"^data\.response_column: must be set together with data\.prompt"):
        load_source(_causal(path, response_column=None), seed=0, task="causal_lm")
    with pytest.raises(ConfigError, match=r"^data\.prompt_column: .*task\.type: causal_lm"):
        load_source(_causal(path), seed=0)


def test_text_column_alone_is_language_modelling(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["one doc", "another doc", "third"], "label": ["a", "b", "a"]}).to_csv(path, index=False)
    raw = load_source(DataConfig(source=f"csv:{path}"), seed=0, task="causal_lm")
    assert raw.prompts == ["", "", ""] and raw.responses == ["one doc", "another doc", "third"]
    assert raw.label_names == ["a", "b"] and raw.labels.tolist() == [0, 1, 0]
    assert list(raw.columns) == ["label"] and raw.columns["label"].tolist() == ["a", "b", "a"]  # for group_by
    with pytest.raises(ConfigError, match=r"^data\.text_column: column 'body' not found"):
        load_source(DataConfig(source=f"csv:{path}", text_column="body"), seed=0, task="causal_lm")


def test_token_id_source_rejected_for_causal_lm():
    with pytest.raises(ConfigError, match=r"^data\.source: synthetic:text-cls .*causal_lm"):
        load_source(DataConfig(source="synthetic:text-cls"), seed=0, task="causal_lm")


def test_classification_tables_keep_scalar_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["x", "y", "x", "y"], "domain": ["n", "m", "n", "m"],
                  "tags": [["t1"], [], ["t2"], ["t3"]], "note": ["short", "x" * 300, "", ""]}) \
        .to_json(path, orient="records", lines=True)
    raw = load_source(DataConfig(source=f"jsonl:{path}"), seed=0)
    assert raw.texts == ["a", "b", "c", "d"] and raw.prompts is None
    assert list(raw.columns) == ["domain"]                    # no lists, no long free text
    assert raw.columns["domain"].tolist() == ["n", "m", "n", "m"]


def test_hf_disk_prompt_response(tmp_path):
    datasets = pytest.importorskip("datasets")  # absent on the GPU machine

    datasets.Dataset.from_dict({"instruction": PROMPTS, "output": RESPONSES, "category": CATEGORIES}) \
        .save_to_disk(str(tmp_path / "ds"))
    raw = load_source(_causal(tmp_path / "ds", kind="hf-disk"), seed=0, task="causal_lm")
    assert raw.prompts == PROMPTS and raw.responses == RESPONSES
    assert raw.columns["category"].tolist() == CATEGORIES


def test_subset_carries_prompts_responses_and_columns():
    raw = RawData(labels=np.array([0, 1, 0]), label_names=["a", "b"], prompts=["p0", "p1", "p2"],
                  responses=["r0", "r1", "r2"], columns={"c": np.array(["x", "y", "z"])})
    sub = raw.subset(np.array([2, 0]))
    assert sub.prompts == ["p2", "p0"] and sub.responses == ["r2", "r0"]
    assert sub.columns["c"].tolist() == ["z", "x"] and sub.labels.tolist() == [0, 0]
    assert sub.texts is None and sub.input_ids is None
