"""Factored norms and the deviation metric (docs/algorithms.md, "Deviation metric" and "Norms and SVDs of factored products")."""

from __future__ import annotations

import numpy as np

from raysim.lora import factors as F
from raysim.lora.factors import LoRAFactors, deviation, normalise_weights, product_fro_norm


def test_qr_and_dense_norms_agree(monkeypatch):
    rng = np.random.default_rng(0)
    p, m = rng.normal(size=(300, 12)), rng.normal(size=(12, 200))
    dense = np.linalg.norm(p @ m)
    monkeypatch.setattr(F, "DENSE_LIMIT", 0)                 # force the QR path
    assert np.isclose(product_fro_norm(p, m), dense, rtol=1e-12)


def test_qr_norm_stays_accurate_when_the_product_nearly_cancels(monkeypatch):
    rng = np.random.default_rng(1)
    b, a = rng.normal(size=(300, 4)) * 1e3, rng.normal(size=(4, 200)) * 1e3
    eps = 1e-9
    # [b | -b·(1+eps)] · [a; a] = -eps·b·a: huge factors, tiny product
    p, m = np.concatenate([b, -b * (1 + eps)], axis=1), np.concatenate([a, a], axis=0)
    truth = eps * np.linalg.norm(b @ a)
    monkeypatch.setattr(F, "DENSE_LIMIT", 0)
    assert abs(product_fro_norm(p, m) - truth) < 1e-3 * truth


def test_deviation_is_nan_when_nothing_trained():
    z = LoRAFactors(a=np.zeros((2, 5)), b=np.zeros((7, 2)), scale=1.0)
    rep = deviation({"q": [(1.0, z)]}, {"q": z}, None)
    assert np.isnan(rep.deviation_rel)


def test_deviation_counts_the_base_delta():
    rng = np.random.default_rng(2)
    f = LoRAFactors(a=rng.normal(size=(2, 5)), b=rng.normal(size=(7, 2)), scale=2.0)
    zero_global = LoRAFactors(a=f.a, b=np.zeros_like(f.b), scale=2.0)
    base = F.BaseDelta(u=2.0 * f.b, v=f.a)                     # everything folded into the base
    assert deviation({"q": [(1.0, f)]}, {"q": zero_global}, {"q": base}).deviation_rel < 1e-12
    assert np.isclose(deviation({"q": [(1.0, f)]}, {"q": zero_global}, None).deviation_rel, 1.0)


def test_weights_are_renormalised():
    np.testing.assert_allclose(normalise_weights([2, 6]), [0.25, 0.75])
    np.testing.assert_allclose(normalise_weights([20, 60]), normalise_weights([2, 6]))
