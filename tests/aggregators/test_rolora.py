"""RoLoRA (raysim/aggregators/rolora.py): alternating phases, B first, exact (docs/algorithms.md, RoLoRA)."""

from __future__ import annotations

import numpy as np

from raysim.aggregators.base import AB

from .helpers import SHAPES, deviation_rel, make_aggregator, make_updates, random_weights

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
        updates = make_updates(agg, rnd, [0, 1, 2], random_weights(3, rng), rng)
        result = agg.aggregate(rnd, updates)
        frozen = "a" if rnd % 2 == 1 else "b"
        trained = "b" if frozen == "a" else "a"
        for mod in SHAPES:
            assert np.array_equal(getattr(agg.global_factors[mod], frozen), getattr(before[mod], frozen))
            assert not np.array_equal(getattr(agg.global_factors[mod], trained), getattr(before[mod], trained))
        assert result.base_delta is None
        assert deviation_rel(updates, agg, None) < 1e-10


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
