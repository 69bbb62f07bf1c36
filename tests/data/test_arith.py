"""synthetic:arith: determinism per seed, correct results, the operator column and its labels."""

import re

import numpy as np
import pytest

from raysim.config import ConfigError, DataConfig
from raysim.data.arith import arith_result, make_arith
from raysim.data.sources import load_source
from raysim.schema import ArithConfig

PROMPT = re.compile(r"^(\d+)([-+*])(\d+)=$")


def _parse(prompt: str) -> tuple[int, str, int]:
    m = PROMPT.match(prompt)
    assert m is not None, prompt
    return int(m.group(1)), m.group(2), int(m.group(3))


def test_arith_is_deterministic_per_seed():
    cfg = ArithConfig(num_examples=200)
    a, b, c = make_arith(cfg, 0), make_arith(cfg, 0), make_arith(cfg, 1)
    assert a.prompts == b.prompts and a.responses == b.responses
    assert np.array_equal(a.columns["operator"], b.columns["operator"])
    assert a.prompts != c.prompts


@pytest.mark.parametrize("modulo", [10, 7, None])
def test_arith_responses_are_the_results(modulo):
    cfg = ArithConfig(num_examples=600, max_operand=12, modulo=modulo)
    raw = make_arith(cfg, seed=3)
    assert len(raw) == 600 and raw.texts is None and raw.input_ids is None
    operands = []
    for prompt, response, op in zip(raw.prompts, raw.responses, raw.columns["operator"]):
        a, sym, b = _parse(prompt)
        assert sym == op
        exact = {"+": a + b, "-": a - b, "*": a * b}[sym]
        assert int(response) == (exact if modulo is None else exact % modulo)
        assert response == str(int(response))               # a plain decimal string
        operands += [a, b]
    assert min(operands) == 0 and max(operands) == 12       # uniform over 0..max_operand, both ends drawn
    values = np.array([int(r) for r in raw.responses])
    if modulo is None:
        assert values.min() < 0                              # exact results keep the sign of 3-7
    else:
        assert values.min() >= 0 and values.max() < modulo


def test_arith_result_uses_python_modulo_for_negative_differences():
    assert arith_result("-", 3, 7, 10) == 6
    assert arith_result("-", 3, 7, None) == -4
    assert arith_result("*", 7, 8, 10) == 6
    with pytest.raises(ValueError):
        arith_result("/", 1, 2, None)


def test_arith_operator_column_and_labels():
    raw = make_arith(ArithConfig(num_examples=3000, operators=["-", "*", "+"]), seed=0)
    assert raw.label_names == ["*", "+", "-"]                # sorted distinct operators
    ops = raw.columns["operator"]
    assert ops.dtype.kind == "U" and ops.shape == (3000,)
    assert [raw.label_names[i] for i in raw.labels] == ops.tolist()
    counts = np.bincount(raw.labels, minlength=3)
    assert np.all(np.abs(counts - 1000) < 120)               # uniform over the operators


def test_arith_single_operator_and_duplicates():
    raw = make_arith(ArithConfig(num_examples=50, operators=["*"]), seed=0)
    assert raw.label_names == ["*"] and np.all(raw.labels == 0)
    weighted = make_arith(ArithConfig(num_examples=3000, operators=["+", "+", "*"]), seed=0)
    share = np.mean(weighted.columns["operator"] == "+")
    assert 0.6 < share < 0.73                                # "+" listed twice: drawn 2/3 of the time


def test_load_source_dispatches_arith_for_causal_lm_only():
    data = DataConfig(source="synthetic:arith", arith=ArithConfig(num_examples=300), max_examples=90)
    raw = load_source(data, seed=5, task="causal_lm")
    full = make_arith(data.arith, 5)
    expected = np.bincount(full.labels) * 90 / 300
    assert len(raw) == 90 and np.all(np.abs(np.bincount(raw.labels) - expected) < 1)   # stratified by operator
    for prompt, response, op in zip(raw.prompts, raw.responses, raw.columns["operator"]):
        i = full.prompts.index(prompt)
        assert full.responses[i] == response and _parse(prompt)[1] == op
    with pytest.raises(ConfigError, match=r"^data\.source: synthetic:arith .*task\.type: causal_lm"):
        load_source(data, seed=5)
