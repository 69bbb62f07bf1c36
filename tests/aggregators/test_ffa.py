"""FFA-LoRA (raysim/aggregators/ffa.py): A frozen bitwise, B averaged, exact (docs/algorithms.md, FFA-LoRA)."""

from __future__ import annotations

import numpy as np

from .helpers import SHAPES, dense_deviation_rel, ideal_dense, make_aggregator, make_updates, product, random_weights


def test_plan_trains_uploads_and_downloads_only_b():
    agg, _ = make_aggregator("ffa")
    for rnd in (1, 2, 5):
        plan = agg.plan(rnd, 1)
        assert plan.train == plan.upload == plan.download == frozenset({"b"})
        assert "a" not in plan.upload
        assert plan.once == {"seed": 1}             # A's shared seed: one scalar, charged once per client


def test_a_is_bitwise_the_shared_init_after_several_rounds():
    agg, init = make_aggregator("ffa")
    rng = np.random.default_rng(0)
    for rnd in range(1, 6):
        clients = sorted(rng.choice(3, size=2, replace=False))
        updates = make_updates(agg, rnd, clients, random_weights(2, rng), rng)
        agg.aggregate(rnd, updates)
        for mod in SHAPES:
            assert agg.global_factors[mod].a.dtype == init[mod].a.dtype
            assert np.array_equal(agg.global_factors[mod].a, init[mod].a)
            assert np.array_equal(agg.plan(rnd + 1, 0).start[mod].a, init[mod].a)


def test_exact_and_b_is_the_weighted_mean():
    agg, _ = make_aggregator("ffa")
    rng = np.random.default_rng(1)
    for rnd in (1, 2, 3):
        weights = random_weights(3, rng)
        updates = make_updates(agg, rnd, [0, 1, 2], weights, rng)
        result = agg.aggregate(rnd, updates)
        assert result.base_delta is None
        assert dense_deviation_rel(updates, agg, result.base_delta) < 1e-10
        for mod in SHAPES:
            g = agg.global_factors[mod]
            expected = sum(w * u.factors[mod].b_tilde() for w, u in zip(weights, updates))
            np.testing.assert_allclose(g.b_tilde(), expected, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(product(g), ideal_dense(updates, mod), rtol=1e-10, atol=1e-12)
