"""FedIT and FedEx-LoRA with clients of different ranks (zero-padded slot-wise average, exact residual)."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.aggregators.fedex import fedex_residual
from raysim.aggregators.padding import zero_padded_mean

from .helpers import (SHAPES, average_factors, base_dense, dense_deviation_rel, ideal_dense, make_aggregator,
                      make_init, make_updates, product, random_weights, scale_of_rank)

MIXED = (2, 4, 4, 1)


@pytest.mark.parametrize("name", ["hetlora", "replication"])
def test_equal_ranks_with_sample_weights_are_fedit_bitwise(name):
    # float32 init: FedIT stores float32, HetLoRA and replication keep the dtype of the global
    init = make_init(SHAPES, 3, np.random.default_rng(1), dtype=np.float32)
    agg, fedit = make_aggregator(name, ranks=(3, 3, 3))[0], make_aggregator("fedit", ranks=(3, 3, 3))[0]
    for a in (agg, fedit):
        a.setup(init, {0: 3, 1: 3, 2: 3}, scale_of_rank, 0)
    rng = np.random.default_rng(0)
    for rnd in (1, 2):
        updates = make_updates(agg, rnd, [2, 0, 1], random_weights(3, rng), rng)
        agg.aggregate(rnd, updates)
        fedit.aggregate(rnd, updates)
        for mod in SHAPES:
            assert np.array_equal(agg.global_factors[mod].a, fedit.global_factors[mod].a)
            assert np.array_equal(agg.global_factors[mod].b, fedit.global_factors[mod].b)


def test_zero_padded_mean_equals_average_factors_bitwise_for_equal_ranks():
    agg, _ = make_aggregator("hetlora", ranks=(3, 3, 3))
    rng = np.random.default_rng(0)
    updates = make_updates(agg, 1, [1, 0, 2], random_weights(3, rng), rng)
    a, b = average_factors(updates, 2.0), zero_padded_mean(updates, agg.global_factors, 2.0)
    for name in SHAPES:
        assert np.array_equal(a[name].a, b[name].a) and np.array_equal(a[name].b, b[name].b)


def test_fedit_mixed_ranks_is_hetlora_with_sample_weights():
    fedit, _ = make_aggregator("fedit", ranks=MIXED)
    het, _ = make_aggregator("hetlora", ranks=MIXED)
    rng = np.random.default_rng(1)
    updates = make_updates(fedit, 1, [0, 1, 2, 3], random_weights(4, rng), rng)
    fedit.aggregate(1, updates)
    het.aggregate(1, updates)
    for name, (m, n) in SHAPES.items():
        f, h = fedit.global_factors[name], het.global_factors[name]
        assert f.a.shape == (4, n) and f.b.shape == (m, 4)
        np.testing.assert_allclose(f.a, h.a, rtol=1e-6, atol=1e-7)               # fedit stores float32
        np.testing.assert_allclose(f.b_tilde(), h.b_tilde(), rtol=1e-6, atol=1e-7)
    for cid, r in enumerate(MIXED):
        assert fedit.plan(2, cid).start["layer.q"].a.shape == (r, SHAPES["layer.q"][1])


@pytest.mark.parametrize("cids", [(0, 1, 2, 3), (3, 0), (1,), (0, 3)])
def test_fedex_mixed_ranks_stays_exact(cids):
    agg, _ = make_aggregator("fedex", ranks=MIXED)
    rng = np.random.default_rng(2)
    for rnd in (1, 2, 3):
        updates = make_updates(agg, rnd, list(cids), random_weights(len(cids), rng), rng)
        old = {k: f.copy() for k, f in agg.global_factors.items()}
        result = agg.aggregate(rnd, updates)
        assert dense_deviation_rel(updates, agg, result.base_delta) < 1e-6
        for name, shape in SHAPES.items():
            applied = base_dense(result.base_delta, name, shape) + product(agg.global_factors[name])
            star = ideal_dense(updates, name)
            assert np.max(np.abs(applied - star)) < 1e-6 * np.linalg.norm(star)
            # factored residual: rank ≤ Σ r_k − r_min (+ the slots kept from the old global)
            ranks = [u.factors[name].rank for u in updates]
            kept = old[name].rank - max(ranks)
            assert result.base_delta[name].u.shape[1] == sum(ranks) - min(ranks) + kept


def test_fedex_zero_weight_client_of_the_highest_rank_changes_nothing():
    """Ranks 2, 2, 4 with p = ½, ½, 0, from a global whose slots 2, 3 carry a product: those slots are owned
    only by the weightless client, keep their value, and their product must leave through the residual."""
    agg, _ = make_aggregator("fedex", ranks=(2, 2, 4), b_zero=False)
    rng = np.random.default_rng(9)
    for rnd in (1, 2):
        old = {k: f.copy() for k, f in agg.global_factors.items()}
        updates = make_updates(agg, rnd, [0, 1, 2], [0.5, 0.5, 0.0], rng)
        result = agg.aggregate(rnd, updates)
        num2 = den2 = 0.0
        for name, shape in SHAPES.items():
            # oracle: ΔW* from the two weighted clients alone, dense float64
            star = sum(0.5 * u.factors[name].scale * u.factors[name].b @ u.factors[name].a for u in updates[:2])
            g = agg.global_factors[name]
            applied = base_dense(result.base_delta, name, shape) + g.scale * g.b.astype(float) @ g.a.astype(float)
            num2 += np.linalg.norm(star - applied) ** 2
            den2 += np.linalg.norm(star) ** 2
            np.testing.assert_array_equal(g.a[2:], old[name].a[2:].astype(np.float32))    # kept, unowned
        assert np.sqrt(num2 / den2) < 1e-6


def test_fedex_residual_equal_ranks_unchanged_layout():
    agg, _ = make_aggregator("fedex", ranks=(2, 2, 2))
    rng = np.random.default_rng(3)
    updates = make_updates(agg, 1, [0, 1, 2], random_weights(3, rng), rng)
    mean = average_factors(updates, 2.0)
    r = fedex_residual(updates, mean)
    for name in SHAPES:
        last = updates[-1].factors[name].b_tilde()
        expect_u = np.concatenate([u.weight * (u.factors[name].b_tilde() - last) for u in updates[:-1]], axis=1)
        assert np.array_equal(r[name].u, expect_u)


def test_resolve_accepts_mixed_ranks_for_fedit_fedex_hetlora_replication(tiny_config):
    for name in ("fedit", "fedex", "hetlora", "replication"):
        cfg = tiny_config(**{"aggregator.name": name, "lora.rank": "{scheme: tiers, ranks: [2, 8], fractions: [0.5, 0.5]}"})
        assert cfg.lora.max_rank() == 8
