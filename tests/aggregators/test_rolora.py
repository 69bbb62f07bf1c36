"""RoLoRA (raysim/aggregators/rolora.py): alternating phases, B first, exact (docs/algorithms.md, RoLoRA)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import AB

from .helpers import SHAPES, make_aggregator, make_updates, random_weights

ONLY_A, ONLY_B = frozenset({"a"}), frozenset({"b"})


def test_phases_alternate_starting_with_b():
    agg, _ = make_aggregator("rolora")
    rng = np.random.default_rng(0)
    for rnd in range(1, 7):
        plan = agg.plan(rnd, 0)
        expected = ONLY_B if rnd % 2 == 1 else ONLY_A
        assert plan.train == plan.upload == expected
        agg.aggregate(rnd, make_updates(agg, rnd, [0, 1], random_weights(2, rng), rng))


def test_frozen_factor_bitwise_unchanged_and_exact_in_every_phase():
    agg, _ = make_aggregator("rolora")
    rng = np.random.default_rng(1)
    for rnd in range(1, 7):
        before = {mod: f.copy() for mod, f in agg.global_factors.items()}
        weights = random_weights(3, rng)
        updates = make_updates(agg, rnd, [0, 1, 2], weights, rng)
        result = agg.aggregate(rnd, updates)
        frozen = "a" if rnd % 2 == 1 else "b"
        trained = "b" if frozen == "a" else "a"
        assert result.base_delta is None
        for mod in SHAPES:
            g = agg.global_factors[mod]
            assert np.array_equal(getattr(g, frozen), getattr(before[mod], frozen))
            assert not np.array_equal(getattr(g, trained), getattr(before[mod], trained))
            # dense float64 oracle: ΔW* = Σ p_k s B_k A_k, and the trained factor is the p-weighted mean
            s = before[mod].scale
            star = sum(w * s * u.factors[mod].b @ u.factors[mod].a for w, u in zip(weights, updates))
            np.testing.assert_allclose(g.scale * g.b @ g.a, star, rtol=0, atol=1e-10 * np.linalg.norm(star))
            mean = sum(w * getattr(u.factors[mod], trained) for w, u in zip(weights, updates))
            np.testing.assert_allclose(getattr(g, trained), mean, rtol=1e-12, atol=1e-14)


def test_download_only_the_factor_changed_last_round_unless_a_round_was_missed():
    agg, _ = make_aggregator("rolora")
    rng = np.random.default_rng(2)
    assert all(agg.plan(1, cid).download == AB for cid in range(3))           # round 1: both
    agg.aggregate(1, make_updates(agg, 1, [0, 1], random_weights(2, rng), rng))
    assert agg.plan(2, 0).download == ONLY_B                                   # B changed in round 1
    assert agg.plan(2, 2).download == AB                                       # missed round 1
    agg.aggregate(2, make_updates(agg, 2, [0, 2], random_weights(2, rng), rng))
    assert agg.plan(3, 0).download == ONLY_A                                   # A changed in round 2
    assert agg.plan(3, 2).download == ONLY_A
    assert agg.plan(3, 1).download == AB                                       # missed round 2
