"""fold_into_base orientation (docs/algorithms.md, "Changing the frozen base") and in-place factor I/O on a PEFT model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import fold_into_base, get_factors, lora_layers, set_factors, wrap_lora
from raysim.models import build_base_model


def _forward_matches(module, w0, r, x):
    expected = x @ (w0 + r).T
    if getattr(module, "bias", None) is not None:
        expected = expected + module.bias
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m,n", [(6, 6), (7, 5)])
def test_fold_into_linear_uses_the_linear_orientation(m, n):
    torch.manual_seed(0)
    lin = torch.nn.Linear(n, m).double()
    w0 = lin.weight.detach().clone()
    r = torch.randn(m, n, dtype=torch.float64)
    assert not torch.allclose(r, r.T) if m == n else True     # non-symmetric: a transpose would show
    fold_into_base(lin, r)
    _forward_matches(lin, w0, r, torch.randn(3, n, dtype=torch.float64))


def test_fold_into_conv1d_transposes():
    torch.manual_seed(1)
    conv = Conv1D(nf=7, nx=5).double()                         # weight stored (in=5, out=7)
    w0 = conv.weight.detach().clone().T                        # (7, 5) in Linear orientation
    r = torch.randn(7, 5, dtype=torch.float64)
    fold_into_base(conv, r)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), x @ (w0 + r).T + conv.bias, rtol=1e-10, atol=1e-10)


def test_fold_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="does not match"):
        fold_into_base(torch.nn.Linear(5, 7), torch.zeros(5, 7))


def test_set_and_get_factors_round_trip_with_a_smaller_client_rank():
    model = wrap_lora(build_base_model("random:bert-mini", 3, seed=0), rank=4, alpha=8,
                      target_modules=["query", "value"], dropout=0.0, seed=0)
    rng = np.random.default_rng(0)
    start = {name: LoRAFactors(a=rng.normal(size=(2, 64)).astype(np.float32),
                               b=rng.normal(size=(64, 2)).astype(np.float32), scale=3.0)
             for name in lora_layers(model)}
    set_factors(model, start)
    got = get_factors(model, {k: 2 for k in start})
    for name, f in start.items():
        np.testing.assert_array_equal(got[name].a, f.a)
        np.testing.assert_array_equal(got[name].b, f.b)
        assert got[name].scale == 3.0
        layer = lora_layers(model)[name]
        assert not layer.lora_A["default"].weight[2:].any()      # surplus slots zeroed
        assert not layer.lora_B["default"].weight[:, 2:].any()
