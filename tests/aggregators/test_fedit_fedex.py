"""FedIT and FedEx-LoRA against float64 oracles (docs/algorithms.md, FedIT and FedEx-LoRA)."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.aggregators.base import ClientUpdate
from raysim.aggregators.fedex import fedex_residual
from raysim.lora.factors import LoRAFactors, deviation

from .helpers import average_factors

SHAPES = {"q": (7, 5), "v": (6, 6)}          # non-square and square


def random_updates(rng, k=3, r=2, scale=2.0, same_a=False, same_b=False):
    weights = rng.uniform(0.5, 2.0, size=k)
    weights /= weights.sum()
    a0 = {n: rng.normal(size=(r, s[1])) for n, s in SHAPES.items()}
    b0 = {n: rng.normal(size=(s[0], r)) for n, s in SHAPES.items()}
    ups = []
    for cid in range(k):
        factors = {n: LoRAFactors(a=a0[n] if same_a else rng.normal(size=(r, s[1])),
                                  b=b0[n] if same_b else rng.normal(size=(s[0], r)), scale=scale)
                   for n, s in SHAPES.items()}
        ups.append(ClientUpdate(cid, float(weights[cid]), 10, factors))
    return ups


def ideal(updates, name):
    return sum(u.weight * u.factors[name].scale * u.factors[name].b @ u.factors[name].a for u in updates)


def per_module(updates):
    return {n: [(u.weight, u.factors[n]) for u in updates] for n in SHAPES}


def test_fedit_error_is_the_weighted_cross_covariance():
    rng = np.random.default_rng(0)
    ups = random_updates(rng)
    mean = average_factors(ups, scale=2.0)
    for n in SHAPES:
        a_bar, b_bar = mean[n].a, mean[n].b
        cov = sum(u.weight * (u.factors[n].b - b_bar) @ (u.factors[n].a - a_bar) for u in ups)
        np.testing.assert_allclose(ideal(ups, n) - 2.0 * b_bar @ a_bar, 2.0 * cov, atol=1e-12)


def test_fedit_deviates_for_distinct_clients_and_not_when_a_factor_is_shared():
    rng = np.random.default_rng(1)
    ups = random_updates(rng)
    assert deviation(per_module(ups), average_factors(ups, 2.0), None).deviation_rel > 1e-3
    for kw in ({"same_a": True}, {"same_b": True}):
        ups = random_updates(rng, **kw)
        assert deviation(per_module(ups), average_factors(ups, 2.0), None).deviation_rel < 1e-12


@pytest.mark.parametrize("k", [1, 2, 4])
def test_fedex_applied_update_equals_ideal(k):
    rng = np.random.default_rng(2)
    ups = random_updates(rng, k=k)
    mean = average_factors(ups, 2.0)
    residual = fedex_residual(ups, mean)
    for n, (m, nn) in SHAPES.items():
        r_dense = residual[n].dense()
        assert r_dense.shape == (m, nn)                                 # nn.Linear orientation (out, in)
        applied = r_dense + 2.0 * mean[n].b @ mean[n].a
        star = ideal(ups, n)
        assert np.max(np.abs(applied - star)) <= 1e-6 * np.linalg.norm(star)
        assert np.linalg.matrix_rank(r_dense) <= (k - 1) * 2
        dense_r = star - 2.0 * mean[n].b @ mean[n].a                    # factored R == dense R
        np.testing.assert_allclose(r_dense, dense_r, atol=1e-12)
    assert deviation(per_module(ups), mean, residual).deviation_rel < 1e-12


def test_fedex_single_client_has_zero_residual():
    ups = random_updates(np.random.default_rng(3), k=1)
    residual = fedex_residual(ups, average_factors(ups, 2.0))
    assert all(r.u.shape[1] == 0 and not r.dense().any() for r in residual.values())


def test_fedex_residual_is_not_transposed_on_square_modules():
    # a transposed residual would still have the right shape on the square 6×6 module
    ups = random_updates(np.random.default_rng(4))
    mean = average_factors(ups, 2.0)
    r = fedex_residual(ups, mean)["v"].dense()
    correct = ideal(ups, "v") - 2.0 * mean["v"].b @ mean["v"].a
    assert not np.allclose(correct, correct.T)
    np.testing.assert_allclose(r, correct, atol=1e-12)
