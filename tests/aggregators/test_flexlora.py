"""FlexLoRA (raysim/aggregators/flexlora.py): exact SVD of ΔW*, per-client truncation (docs/algorithms.md, FlexLoRA)."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.aggregators.base import truncate
from raysim.aggregators.flexlora import thin_svd

from .helpers import ideal_dense, make_aggregator, make_updates, product, random_weights, scale_of_rank

# q = 6 stacked slots: dense SVD path for (7, 5) and (6, 6), QR path for (20, 12)
SHAPES3 = {"layer.q": (7, 5), "layer.v": (6, 6), "layer.big": (20, 12)}


def dense_sigma(updates, mod):
    return np.linalg.svd(ideal_dense(updates, mod), compute_uv=False)


@pytest.mark.parametrize("q,shape", [(3, (20, 12)), (6, (7, 5)), (6, (6, 6)), (12, (9, 8))])
def test_thin_svd_matches_dense(q, shape):
    rng = np.random.default_rng(q)
    u, v = rng.normal(size=(shape[0], q)), rng.normal(size=(q, shape[1]))
    y, sigma, z = thin_svd(u, v)
    k = min(q, *shape)
    assert y.shape == (shape[0], k) and sigma.shape == (k,) and z.shape == (shape[1], k)
    np.testing.assert_allclose(sigma, np.linalg.svd(u @ v, compute_uv=False)[:k], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose((y * sigma) @ z.T, u @ v, atol=1e-12 * np.abs(u @ v).max())
    np.testing.assert_allclose(y.T @ y, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(z.T @ z, np.eye(k), atol=1e-12)


def test_first_round_plan_is_the_truncated_init():
    agg, init = make_aggregator("flexlora", ranks=(1, 2, 3), shapes=SHAPES3)
    plan = agg.plan(1, 0)
    expected = truncate(init, 1, scale_of_rank(1))
    for mod in SHAPES3:
        assert np.array_equal(plan.start[mod].a, expected[mod].a)
        assert np.array_equal(plan.start[mod].b, expected[mod].b)


@pytest.mark.parametrize("split", ["even", "us_v"])
def test_singular_values_truncation_error_and_deviation(split):
    ranks = (1, 2, 3)
    agg, _ = make_aggregator("flexlora", {"split": split}, ranks=ranks, shapes=SHAPES3)
    rng = np.random.default_rng(0)
    weights = random_weights(3, rng)
    updates = make_updates(agg, 1, [0, 1, 2], weights, rng)
    result = agg.aggregate(1, updates)
    num2 = den2 = glob2 = 0.0
    for mod in SHAPES3:
        star = ideal_dense(updates, mod)
        sigma = dense_sigma(updates, mod)
        stored = agg.svd[mod][1]
        np.testing.assert_allclose(stored, sigma[:stored.size], rtol=1e-10, atol=1e-12 * sigma[0])
        for cid, rank in agg.client_ranks.items():
            f = agg.plan(2, cid).start[mod]
            assert f.rank == rank and f.scale == scale_of_rank(rank)
            err = np.linalg.norm(star - product(f))
            assert err == pytest.approx(np.sqrt(np.sum(sigma[rank:] ** 2)), rel=1e-9, abs=1e-12)
            if split == "us_v":
                np.testing.assert_allclose(f.a @ f.a.T, np.eye(rank), atol=1e-12)
        num2 += sum(w * np.sum(sigma[r:] ** 2) for w, r in zip(weights, ranks))
        den2 += np.sum(sigma ** 2)
        glob2 += np.sum(sigma[max(ranks):] ** 2)
        g = agg.global_factors[mod]
        assert g.rank == max(ranks)
        assert np.linalg.norm(star - product(g)) == pytest.approx(np.sqrt(np.sum(sigma[3:] ** 2)), rel=1e-9)
    assert result.deviation_rel == pytest.approx(np.sqrt(num2 / den2), rel=1e-10)
    assert result.stats["global_trunc_err_rel"] == pytest.approx(np.sqrt(glob2 / den2), rel=1e-10)
    assert result.deviation_rel > 0


def test_rank_at_least_rank_of_ideal_is_exact_with_live_surplus_slots():
    agg, _ = make_aggregator("flexlora", ranks=(1, 1, 4), shapes=SHAPES3)
    rng = np.random.default_rng(1)
    updates = make_updates(agg, 1, [0, 1], random_weights(2, rng), rng)    # rank(ΔW*) ≤ 2
    result = agg.aggregate(1, updates)
    assert result.stats["global_trunc_err_rel"] < 1e-10                   # r_max = 4 ≥ rank
    assert result.deviation_rel > 1e-3                                    # the rank-1 clients lose σ₂
    for mod, (m, n) in SHAPES3.items():
        star = ideal_dense(updates, mod)
        for f in (agg.plan(2, 2).start[mod], agg.global_factors[mod]):
            assert f.rank == 4
            assert np.linalg.norm(star - product(f)) < 1e-10 * np.linalg.norm(star)
            assert np.all(np.abs(f.a[2:]).max(axis=1) > 0)          # surplus A rows: fresh, non-zero
            assert np.all(np.abs(f.a[2:]) <= 1 / np.sqrt(n))
            assert not np.any(f.b[:, 2:])                          # surplus B columns: zero
    # dead-slot fill is seeded per (round, client): deterministic
    assert np.array_equal(agg.plan(2, 2).start["layer.q"].a, agg.plan(2, 2).start["layer.q"].a)
