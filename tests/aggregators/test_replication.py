"""Replication-based padding against float64 oracles, and its contrast with zero-padding (docs/algorithms.md,
Replication padding)."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.aggregators.base import ClientUpdate

from .helpers import SHAPES, make_aggregator, make_updates, random_weights


@pytest.mark.parametrize("rank", [2, 5])
def test_single_client_returns_that_client(rank):
    agg, _ = make_aggregator("replication", ranks=(rank, 5))
    rng = np.random.default_rng(2)
    before = {k: f.copy() for k, f in agg.global_factors.items()}
    (u,) = make_updates(agg, 1, [0], [1.0], rng)
    agg.aggregate(1, [u])
    for name in SHAPES:
        g, f = agg.global_factors[name], u.factors[name]
        np.testing.assert_allclose(g.a[:rank], f.a, rtol=1e-14)
        np.testing.assert_allclose(g.b_tilde()[:, :rank], f.b_tilde(), rtol=1e-14)
        np.testing.assert_array_equal(g.a[rank:], before[name].a[rank:])     # slots nobody owned: kept


def _pair(ranks, seed):
    zero, _ = make_aggregator("hetlora", ranks=ranks)
    rep, _ = make_aggregator("replication", ranks=ranks)
    rng = np.random.default_rng(seed)
    updates = make_updates(zero, 1, list(range(len(ranks))), random_weights(len(ranks), rng), rng)
    zero.aggregate(1, updates)
    rep.aggregate(1, updates)
    return zero, rep, updates


def test_zero_padding_is_replication_scaled_by_pi():
    ranks = (5, 5, 5, 20, 5, 20)                              # ranks {5, 20}
    zero, rep, updates = _pair(ranks, 3)
    for name in SHAPES:
        z, r = zero.global_factors[name], rep.global_factors[name]
        for j in range(20):
            pi = sum(u.weight for u in updates if u.factors[name].rank > j)
            np.testing.assert_allclose(z.a[j], pi * r.a[j], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(z.b_tilde()[:, j], pi * r.b_tilde()[:, j], rtol=1e-12, atol=1e-15)
            if j < 5:
                assert pi == pytest.approx(1.0)
                np.testing.assert_array_equal(z.a[j], r.a[j])                 # shared slots agree bitwise


def test_fill_with_owners_mean_is_a_fixed_point():
    ranks = (2, 4, 4, 3)
    zero, rep, updates = _pair(ranks, 4)
    for name in SHAPES:
        g = rep.global_factors[name]
        # pad every low-rank client with the owners' mean (= the replication result) and average plainly
        a_avg = sum(u.weight * np.concatenate([u.factors[name].a, g.a[u.factors[name].rank:]]) for u in updates)
        bt_avg = sum(u.weight * np.concatenate([u.factors[name].b_tilde(), g.b_tilde()[:, u.factors[name].rank:]],
                                               axis=1) for u in updates)
        np.testing.assert_allclose(a_avg, g.a, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(bt_avg, g.b_tilde(), rtol=1e-12, atol=1e-15)


def test_slots_with_no_owner_keep_their_previous_value():
    agg, _ = make_aggregator("replication", ranks=(2, 2, 6))
    rng = np.random.default_rng(5)
    agg.aggregate(1, make_updates(agg, 1, [0, 2], random_weights(2, rng), rng))
    before = {k: f.copy() for k, f in agg.global_factors.items()}
    agg.aggregate(2, make_updates(agg, 2, [0, 1], random_weights(2, rng), rng))
    for name in SHAPES:
        np.testing.assert_array_equal(agg.global_factors[name].a[2:], before[name].a[2:])
        np.testing.assert_allclose(agg.global_factors[name].b_tilde()[:, 2:], before[name].b_tilde()[:, 2:],
                                   rtol=1e-15)


def test_high_slots_are_not_diluted_over_rounds():
    """One high-rank client of weight 0.1 that keeps its slots: replication keeps them, zero-padding
    shrinks the slot product by π² per round (HetLoRA's 'dilution')."""
    ranks = (2,) * 9 + (4,)
    zero, _ = make_aggregator("hetlora", ranks=ranks, b_zero=False)
    rep, _ = make_aggregator("replication", ranks=ranks, b_zero=False)
    w = [0.1] * 10
    for agg in (zero, rep):
        for rnd in (1, 2):
            updates = [ClientUpdate(c, w[c], 10, agg.plan(rnd, c).start) for c in range(10)]   # nobody trains
            agg.aggregate(rnd, updates)
    for name in SHAPES:
        z, r = zero.global_factors[name], rep.global_factors[name]
        # slot 3: after two rounds zero-padding has scaled A and B̃ by 0.1² each -> product by 1e-4
        ratio = np.linalg.norm(np.outer(z.b_tilde()[:, 3], z.a[3])) / np.linalg.norm(np.outer(r.b_tilde()[:, 3], r.a[3]))
        assert ratio == pytest.approx(1e-4, rel=1e-9)
        np.testing.assert_allclose(z.a[:2], r.a[:2], rtol=1e-12)
