"""FedSA-LoRA (raysim/aggregators/fedsa.py): shared Ā, personal B untouched (docs/algorithms.md, FedSA-LoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .helpers import SHAPES, make_aggregator, make_updates, random_weights

ONLY_A = frozenset({"a"})


def test_declares_personalised_and_uploads_no_b():
    agg, _ = make_aggregator("fedsa")
    assert agg.personalized and not agg.exact
    plan = agg.plan(1, 0)
    assert plan.upload == plan.download == ONLY_A
    assert "b" not in plan.upload
    assert plan.train == frozenset({"a", "b"})
    for mod, (m, _) in SHAPES.items():
        assert np.array_equal(plan.start[mod].b, np.zeros((m, 2)))            # B_k starts at 0


def test_all_receive_the_same_a_bar_and_keep_their_own_b():
    agg, _ = make_aggregator("fedsa")
    rng = np.random.default_rng(0)
    weights = random_weights(2, rng)
    updates = make_updates(agg, 1, [0, 2], weights, rng)
    agg.aggregate(1, updates)
    plans = {cid: agg.plan(2, cid) for cid in range(3)}
    for mod in SHAPES:
        a_bar = sum(w * u.factors[mod].a for w, u in zip(weights, updates))
        for cid in range(3):
            np.testing.assert_allclose(plans[cid].start[mod].a, a_bar, rtol=1e-12, atol=1e-15)
            assert np.array_equal(plans[cid].start[mod].a, plans[0].start[mod].a)
        for u in updates:                                  # B_k bitwise as the client left it
            assert np.array_equal(plans[u.client_id].start[mod].b, u.factors[mod].b)
        assert not np.any(plans[1].start[mod].b)          # never sampled: still 0

    # a later round leaves the B of clients that do not take part untouched
    b2 = {mod: plans[2].start[mod].b.copy() for mod in SHAPES}
    agg.aggregate(2, make_updates(agg, 2, [0, 1], random_weights(2, rng), rng))
    for mod in SHAPES:
        assert np.array_equal(agg.plan(3, 2).start[mod].b, b2[mod])


def test_diagnostic_global_and_drift_statistic():
    agg, _ = make_aggregator("fedsa")
    rng = np.random.default_rng(1)
    weights = random_weights(3, rng)
    updates = make_updates(agg, 1, [0, 1, 2], weights, rng)
    result = agg.aggregate(1, updates)
    ev = agg.evaluation_factors()
    drifts = []
    for u in updates:
        num2 = den2 = 0.0
        for mod in SHAPES:
            f = u.factors[mod]
            num2 += np.linalg.norm(f.b_tilde() @ (ev[mod].a - f.a)) ** 2
            den2 += np.linalg.norm(f.b_tilde() @ f.a) ** 2
        drifts.append(np.sqrt(num2 / den2))
    assert result.stats["broadcast_drift_mean"] == pytest.approx(np.dot(weights, drifts), rel=1e-12)
    assert result.stats["broadcast_drift_max"] == pytest.approx(max(drifts), rel=1e-12)
    for mod in SHAPES:
        expected_bt = sum(w * u.factors[mod].b_tilde() for w, u in zip(weights, updates))
        np.testing.assert_allclose(ev[mod].b_tilde(), expected_bt, rtol=1e-12, atol=1e-14)


def test_personal_b_survives_checkpoint():
    agg, _ = make_aggregator("fedsa")
    rng = np.random.default_rng(2)
    updates = make_updates(agg, 1, [1, 2], random_weights(2, rng), rng)
    agg.aggregate(1, updates)
    tensors, meta = agg.state_dict()
    restored, _ = make_aggregator("fedsa")
    restored.load_state_dict(dict(tensors), json.loads(json.dumps(meta)))
    assert set(restored.client_b) == {1, 2}
    for u in updates:
        for mod in SHAPES:
            assert np.array_equal(restored.client_b[u.client_id][mod], u.factors[mod].b)
