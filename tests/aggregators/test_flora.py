"""FLoRA (raysim/aggregators/flora.py): stacking merged into the base, fresh adapters (docs/algorithms.md, FLoRA)."""

from __future__ import annotations

import numpy as np
import pytest

from .helpers import (SHAPES, dense_deviation_rel, ideal_dense, make_aggregator, make_updates, product,
                      random_weights, scale_of_rank)


@pytest.mark.parametrize("ranks", [(2, 2, 2), (2, 4, 8)])
def test_new_base_is_old_base_plus_ideal_update_and_exact(ranks):
    agg, _ = make_aggregator("flora", ranks=ranks)
    rng = np.random.default_rng(0)
    for rnd in (1, 2):
        updates = make_updates(agg, rnd, [0, 1, 2], random_weights(3, rng), rng)
        result = agg.aggregate(rnd, updates)
        q = sum(ranks)
        for mod, (m, n) in SHAPES.items():
            delta = result.base_delta[mod]
            assert delta.u.shape == (m, q) and delta.v.shape == (q, n)
            star = ideal_dense(updates, mod)
            np.testing.assert_allclose(delta.dense(), star, rtol=1e-12, atol=1e-12 * np.abs(star).max())
            g = agg.global_factors[mod]
            assert g.rank == max(ranks) and not np.any(g.b)       # fresh global: B = 0
        assert dense_deviation_rel(updates, agg, result.base_delta) < 1e-10
        assert result.stats["stack_rank"] == q


def test_fresh_client_adapters_are_seeded_free_and_add_nothing():
    agg, _ = make_aggregator("flora", ranks=(2, 4, 8), seed=11)
    same_seed, _ = make_aggregator("flora", ranks=(2, 4, 8), seed=11)
    other_seed, _ = make_aggregator("flora", ranks=(2, 4, 8), seed=12)
    for cid, rank in agg.client_ranks.items():
        plan = agg.plan(3, cid)
        assert plan.download == frozenset()                       # seed-derived: no factor download
        assert plan.once == {"seed": 1}                           # only the seed, charged once per client
        assert plan.train == plan.upload == frozenset({"a", "b"})
        for mod, (m, n) in SHAPES.items():
            f = plan.start[mod]
            assert f.a.shape == (rank, n) and f.b.shape == (m, rank) and f.scale == scale_of_rank(rank)
            assert not np.any(product(f))                         # forward output unchanged
            assert np.all(np.abs(f.a) <= 1 / np.sqrt(n)) and np.any(f.a)
            assert np.array_equal(f.a, same_seed.plan(3, cid).start[mod].a)      # from the seed alone
            assert not np.allclose(f.a, other_seed.plan(3, cid).start[mod].a)
            assert not np.allclose(f.a, agg.plan(4, cid).start[mod].a)           # new each round
    assert not np.array_equal(agg.plan(3, 0).start["layer.q"].a, agg.plan(3, 1).start["layer.q"].a[:2])


def test_client_order_is_irrelevant_bitwise():
    agg1, _ = make_aggregator("flora", ranks=(2, 4, 8))
    agg2, _ = make_aggregator("flora", ranks=(2, 4, 8))
    rng = np.random.default_rng(1)
    updates = make_updates(agg1, 1, [0, 1, 2], random_weights(3, rng), rng)
    r1 = agg1.aggregate(1, updates)
    r2 = agg2.aggregate(1, [updates[2], updates[0], updates[1]])
    for mod in SHAPES:
        assert np.array_equal(r1.base_delta[mod].dense(), r2.base_delta[mod].dense())
        assert np.array_equal(agg1.global_factors[mod].a, agg2.global_factors[mod].a)
