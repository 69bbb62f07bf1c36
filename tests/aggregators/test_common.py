"""Properties every registered aggregator must have (docs/algorithms.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raysim.aggregators import REGISTRY, build_aggregator
from raysim.aggregators.base import AB
from raysim.errors import ConfigError

from .helpers import (SHAPES, applied_dense, base_dense, dense_deviation_rel, ideal_dense, make_aggregator,
                      make_updates, product, random_weights, tolerance)

NAMES = sorted(REGISTRY)
MIXED_RANK_NAMES = sorted(n for n, cls in REGISTRY.items() if cls.mixed_ranks)
REPARAMETRISING = {"flora", "flexlora"}    # return the same product in other factors (fresh / SVD)
LOCAL_FRAME = {"celora"}    # A_k, B_k stay on the clients: the global model is the shared frame with C̄


def assert_same_plan(p1, p2, exact: bool = True, rtol: float = 1e-12):
    assert (p1.train, p1.upload, p1.download) == (p2.train, p2.upload, p2.download)
    assert set(p1.start) == set(p2.start)
    for name, f in p1.start.items():
        g = p2.start[name]
        assert f.scale == g.scale
        if exact:
            assert np.array_equal(f.a, g.a) and np.array_equal(f.b, g.b), name
        else:
            np.testing.assert_allclose(product(f), product(g), rtol=rtol, atol=rtol * np.abs(product(f)).max())


def assert_same_state(agg1, agg2, res1, res2, rtol: float, factors_too: bool):
    for name in SHAPES:
        f1, f2 = agg1.evaluation_factors()[name], agg2.evaluation_factors()[name]
        total1, total2 = applied_dense(agg1, res1.base_delta, name), applied_dense(agg2, res2.base_delta, name)
        np.testing.assert_allclose(total1, total2, rtol=rtol, atol=rtol * max(1.0, np.abs(total1).max()))
        if factors_too:
            np.testing.assert_allclose(f1.a, f2.a, rtol=rtol, atol=rtol)
            np.testing.assert_allclose(f1.b, f2.b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", NAMES)
def test_declares_contract(name):
    cls = REGISTRY[name]
    info = cls.describe()
    assert info["summary"] and cls.uploads and cls.broadcasts and cls.comm_per_module
    assert not (cls.exact and cls.personalized)
    with pytest.raises(ConfigError):
        build_aggregator(name, {"no_such_param": 1})


@pytest.mark.parametrize("name", NAMES)
def test_plan_is_well_formed(name):
    agg, _ = make_aggregator(name)
    rng = np.random.default_rng(3)
    for rnd in (1, 2):
        for cid, rank in agg.client_ranks.items():
            plan = agg.plan(rnd, cid)
            factors = AB | ({"c"} if any(f.c is not None for f in plan.start.values()) else set())
            assert plan.train <= factors and plan.upload <= factors and plan.download <= factors
            assert plan.upload <= plan.train
            assert set(plan.start) == set(SHAPES)
            for mod, (m, n) in SHAPES.items():
                f = plan.start[mod]
                assert f.a.shape == (rank, n) and f.b.shape == (m, rank)
        agg.aggregate(rnd, make_updates(agg, rnd, [0, 1, 2], random_weights(3, rng), rng))


@pytest.mark.parametrize("name", NAMES)
def test_identical_clients_keep_their_adapter_and_deviate_zero(name):
    agg, _ = make_aggregator(name)
    rng = np.random.default_rng(4)
    for rnd in (1, 2):
        updates = make_updates(agg, rnd, [0, 1, 2], random_weights(3, rng), rng, identical=True)
        result = agg.aggregate(rnd, updates)
        tol = tolerance(agg.evaluation_factors())
        if name in LOCAL_FRAME:        # each participant continues from exactly its own adapter
            for u in updates:
                for mod, f in agg.plan(rnd + 1, u.client_id).start.items():
                    np.testing.assert_allclose(product(f), product(u.factors[mod]), rtol=tol, atol=tol)
            continue
        for mod in SHAPES:                 # the evaluated model moved by exactly the common ΔW
            star = ideal_dense(updates, mod)
            np.testing.assert_allclose(applied_dense(agg, result.base_delta, mod), star, rtol=tol,
                                       atol=tol * np.abs(star).max())
        if result.deviation_rel is not None:
            assert result.deviation_rel < tol
        if name not in REPARAMETRISING:
            for mod, f in agg.evaluation_factors().items():
                client = updates[0].factors[mod]
                np.testing.assert_allclose(f.a, client.a, rtol=tol, atol=tol)
                np.testing.assert_allclose(f.b_tilde(), client.b_tilde(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_client_order_is_irrelevant(name):
    agg1, _ = make_aggregator(name)
    agg2, _ = make_aggregator(name)
    rng = np.random.default_rng(5)
    for rnd in (1, 2, 3):
        updates = make_updates(agg1, rnd, [0, 1, 2], random_weights(3, rng), rng)
        res1 = agg1.aggregate(rnd, updates)
        res2 = agg2.aggregate(rnd, updates[::-1])
        tol = tolerance(agg1.evaluation_factors())
        assert_same_state(agg1, agg2, res1, res2, rtol=tol, factors_too=True)
        if res1.deviation_rel is not None:
            assert res1.deviation_rel == pytest.approx(res2.deviation_rel, rel=1e-12, nan_ok=True)
        for cid in range(3):
            assert_same_plan(agg1.plan(rnd + 1, cid), agg2.plan(rnd + 1, cid), exact=False, rtol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_client_with_zero_weight_changes_nothing(name):
    ranks = (2, 2, 2, 2)
    agg1, _ = make_aggregator(name, ranks=ranks)
    agg2, _ = make_aggregator(name, ranks=ranks)
    rng = np.random.default_rng(6)
    for rnd in (1, 2):
        updates = make_updates(agg1, rnd, [0, 1, 2, 3], list(random_weights(3, rng)) + [0.0], rng)
        res1 = agg1.aggregate(rnd, updates[:3])
        res2 = agg2.aggregate(rnd, updates)
        tol = tolerance(agg1.evaluation_factors())
        assert_same_state(agg1, agg2, res1, res2, rtol=1e-9 if tol < 1e-9 else tol,
                          factors_too=name not in REPARAMETRISING)
        if res1.deviation_rel is not None:
            assert res1.deviation_rel == pytest.approx(res2.deviation_rel, rel=1e-9)
        for cid in range(3):
            assert_same_plan(agg1.plan(rnd + 1, cid), agg2.plan(rnd + 1, cid), exact=False, rtol=1e-9)


@pytest.mark.parametrize("name", MIXED_RANK_NAMES)
def test_client_of_the_highest_rank_with_zero_weight_changes_nothing(name):
    """Ranks 2, 2, 4 with p = ½, ½, 0: the slots only the weightless client owns keep their value, and the
    evaluated model moves exactly as without that client (docs/algorithms.md, Client weights). The init has
    B ≠ 0, so the kept slots carry a product."""
    ranks = (2, 2, 4)
    agg1, _ = make_aggregator(name, ranks=ranks, b_zero=False)
    agg2, _ = make_aggregator(name, ranks=ranks, b_zero=False)
    rng = np.random.default_rng(16)
    for rnd in (1, 2):
        updates = make_updates(agg1, rnd, [0, 1, 2], [0.5, 0.5, 0.0], rng)
        res1 = agg1.aggregate(rnd, updates[:2])
        res2 = agg2.aggregate(rnd, updates)
        assert_same_state(agg1, agg2, res1, res2, rtol=1e-9, factors_too=name not in REPARAMETRISING)
        assert dense_deviation_rel(updates, agg2, res2.base_delta) == pytest.approx(
            dense_deviation_rel(updates[:2], agg1, res1.base_delta), rel=1e-6, abs=1e-9)
        for attr in ("deviation_rel", "deviation_rel_round"):
            if getattr(res1, attr) is not None:
                assert getattr(res2, attr) == pytest.approx(getattr(res1, attr), rel=1e-9)
        if res1.base_delta is not None:     # the weightless client is not even sent: no extra width
            assert all(d.u.shape == res1.base_delta[k].u.shape for k, d in res2.base_delta.items())
        for cid in range(3):
            assert_same_plan(agg1.plan(rnd + 1, cid), agg2.plan(rnd + 1, cid), exact=False, rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_reproduces_the_next_plans(name):
    agg1, init = make_aggregator(name)
    rng = np.random.default_rng(7)
    updates = make_updates(agg1, 1, [0, 1], random_weights(2, rng), rng)
    agg1.aggregate(1, updates)

    tensors, meta = agg1.state_dict()
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in tensors.items())
    meta = json.loads(json.dumps(meta))                     # checkpoints store JSON
    tensors = {k: np.array(v, copy=True) for k, v in tensors.items()}
    agg2, _ = make_aggregator(name)
    agg2.load_state_dict(tensors, meta)

    for cid in range(3):
        assert_same_plan(agg1.plan(2, cid), agg2.plan(2, cid))
    updates = make_updates(agg1, 2, [0, 2], random_weights(2, rng), rng)
    agg1.aggregate(2, updates)
    agg2.aggregate(2, updates)
    for cid in range(3):
        assert_same_plan(agg1.plan(3, cid), agg2.plan(3, cid))
    for mod in SHAPES:
        assert np.array_equal(agg1.evaluation_factors()[mod].a, agg2.evaluation_factors()[mod].a)
        assert np.array_equal(agg1.evaluation_factors()[mod].b, agg2.evaluation_factors()[mod].b)
