"""HetLoRA (zero-padding) against float64 oracles (docs/algorithms.md, HetLoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raysim.aggregators.base import ClientUpdate
from raysim.aggregators.hetlora import pruned_rank, sparsity_weights

from .helpers import SHAPES, make_aggregator, make_init, make_updates, product, random_weights

RANKS = (2, 5, 5, 3)


def _updates(agg, rnd, rng, cids=(0, 1, 2, 3)):
    return make_updates(agg, rnd, list(cids), random_weights(len(cids), rng), rng)


def test_zero_padding_is_the_weighted_slot_sum():
    agg, init = make_aggregator("hetlora", ranks=RANKS)
    rng = np.random.default_rng(2)
    updates = _updates(agg, 1, rng)
    result = agg.aggregate(1, updates)
    for name, (m, n) in SHAPES.items():
        g = agg.global_factors[name]
        assert g.a.shape == (5, n) and g.b.shape == (m, 5)
        for j in range(5):
            owners = [u for u in updates if u.factors[name].rank > j]
            a_j = sum(u.weight * u.factors[name].a[j] for u in owners)
            b_j = sum(u.weight * u.factors[name].b_tilde()[:, j] for u in owners)
            np.testing.assert_allclose(g.a[j], a_j, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(g.b_tilde()[:, j], b_j, rtol=1e-12, atol=1e-14)
    pi_last = sum(u.weight for u in updates if u.factors["layer.q"].rank == 5)
    assert result.stats["pi_last_slot"] == pytest.approx(pi_last)
    assert result.stats["pi_first_slot"] == pytest.approx(1.0)
    assert result.stats["owners_last_slot"] == 2


def test_truncation_gives_each_client_its_rank_and_padding_restores_it():
    agg, _ = make_aggregator("hetlora", ranks=RANKS)
    rng = np.random.default_rng(3)
    agg.aggregate(1, _updates(agg, 1, rng))
    for cid, r in enumerate(RANKS):
        plan = agg.plan(2, cid)
        for name, (m, n) in SHAPES.items():
            f = plan.start[name]
            assert f.a.shape == (r, n) and f.b.shape == (m, r)
            g = agg.global_factors[name]
            np.testing.assert_array_equal(f.a, g.a[:r])
            np.testing.assert_allclose(f.b_tilde(), g.b_tilde()[:, :r], rtol=1e-14)
        # a client that sends back its start unchanged leaves its own slots unchanged (weight 1)
    start = agg.plan(2, 0).start
    one = ClientUpdate(0, 1.0, 10, {k: f.copy() for k, f in start.items()})
    before = {k: f.copy() for k, f in agg.global_factors.items()}
    agg.aggregate(2, [one])
    for name in SHAPES:
        np.testing.assert_allclose(agg.global_factors[name].a[:2], before[name].a[:2], rtol=1e-14)
        np.testing.assert_array_equal(agg.global_factors[name].a[2:], before[name].a[2:])   # no owner: kept


def test_slots_nobody_owns_keep_or_zero():
    keep, _ = make_aggregator("hetlora", ranks=(2, 2, 5))
    zero, _ = make_aggregator("hetlora", {"empty_slots": "zero"}, ranks=(2, 2, 5))
    rng = np.random.default_rng(4)
    upd = make_updates(keep, 1, [0, 1], random_weights(2, rng), rng)
    before = {k: f.copy() for k, f in keep.global_factors.items()}
    keep.aggregate(1, upd)
    zero.aggregate(1, upd)
    for name in SHAPES:
        np.testing.assert_array_equal(keep.global_factors[name].a[2:], before[name].a[2:])
        assert not zero.global_factors[name].a[2:].any() and not zero.global_factors[name].b[:, 2:].any()


def test_sparsity_weights_sum_to_one_and_follow_the_product_norms():
    agg, _ = make_aggregator("hetlora", {"weights": "sparsity"}, ranks=RANKS)
    rng = np.random.default_rng(5)
    updates = _updates(agg, 1, rng)
    for name in SHAPES:
        w = sparsity_weights([u.factors[name] for u in updates], [u.weight for u in updates])
        norms = np.array([np.linalg.norm(product(u.factors[name])) for u in updates])
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(w, norms / norms.sum(), rtol=1e-10)
    agg.aggregate(1, updates)
    for name in SHAPES:
        w = sparsity_weights([u.factors[name] for u in updates], [u.weight for u in updates])
        a0 = sum(wk * u.factors[name].a[0] for wk, u in zip(w, updates))
        np.testing.assert_allclose(agg.global_factors[name].a[0], a0, rtol=1e-12)


def test_sparsity_weights_fall_back_when_every_product_is_zero():
    agg, init = make_aggregator("hetlora", ranks=(2, 2))
    fs = [agg.plan(1, 0).start["layer.q"]] * 2                       # B = 0 at init
    np.testing.assert_allclose(sparsity_weights(fs, [0.25, 0.75]), [0.25, 0.75])


def test_self_pruning_lowers_ranks_only_when_the_tail_is_small_and_persists():
    rng = np.random.default_rng(6)
    agg, _ = make_aggregator("hetlora", {"prune": True, "prune_gamma": 0.5, "prune_tol": 0.05}, ranks=(4, 4))
    updates = _updates(agg, 1, rng, cids=(0, 1))
    for name in SHAPES:                                          # client 0: tail slots 2, 3 almost empty
        f = updates[0].factors[name]
        f.b[:, 2:] *= 1e-4
    result = agg.aggregate(1, updates)
    assert agg.client_ranks == {0: 2, 1: 4}
    assert result.stats["pruned"] == 1
    assert agg.plan(2, 0).start["layer.q"].a.shape[0] == 2
    tensors, meta = agg.state_dict()
    agg2, _ = make_aggregator("hetlora", {"prune": True}, ranks=(4, 4))
    agg2.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert agg2.client_ranks == {0: 2, 1: 4}


def test_pruned_rank_rule():
    rng = np.random.default_rng(7)
    init = make_init(SHAPES, 10, rng, b_zero=False)
    assert pruned_rank(init, 10, 0.9, 0.05, 1) == 10                 # full tail: keep
    for f in init.values():
        f.b[:, 9:] = 0.0
    assert pruned_rank(init, 10, 0.9, 0.05, 1) == 9
    assert pruned_rank(init, 1, 0.9, 0.05, 1) == 1                    # never below min_rank


def test_off_by_default_and_ranks_unchanged():
    agg, _ = make_aggregator("hetlora", ranks=RANKS)
    rng = np.random.default_rng(8)
    result = agg.aggregate(1, _updates(agg, 1, rng))
    assert "pruned" not in result.stats
    assert agg.client_ranks == dict(enumerate(RANKS))
