"""FlexLoRA (raysim/aggregators/flexlora.py): exact SVD of ΔW*, per-client truncation (docs/algorithms.md, FlexLoRA)."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.aggregators.base import truncate
from raysim.aggregators import flexlora
from raysim.aggregators.flexlora import none_missed, thin_svd, top_eigenpairs
from raysim.aggregators.state import encode
from raysim.lora import factors as factors_module
from raysim.lora.factors import ideal_update

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
    # the dead-slot fill is seeded by (seed, round, client): another server with the same seed and uploads
    # sends the same fill, another client, round or seed gets a different one
    again, _ = make_aggregator("flexlora", ranks=(1, 1, 4), shapes=SHAPES3)
    other_seed, _ = make_aggregator("flexlora", ranks=(1, 1, 4), shapes=SHAPES3, seed=5)
    for a in (again, other_seed):
        a.aggregate(1, updates)
    fill = agg.plan(2, 2).start["layer.q"].a[2:]
    assert np.array_equal(again.plan(2, 2).start["layer.q"].a[2:], fill)
    for different in (other_seed.plan(2, 2), agg.plan(3, 2)):
        assert not np.allclose(different.start["layer.q"].a[2:], fill)


def test_evaluated_model_is_the_full_rank_aggregate_and_clients_never_train_on_the_tail():
    """The global model is W0 + ΔW* at full rank (r_max adapter + evaluation_base_delta), q = 6 > r_max = 3."""
    ranks = (1, 2, 3)
    agg, _ = make_aggregator("flexlora", ranks=ranks, shapes=SHAPES3)
    rng = np.random.default_rng(2)
    assert agg.evaluation_base_delta() is None                           # nothing aggregated yet
    for rnd in (1, 2):
        updates = make_updates(agg, rnd, [0, 1, 2], random_weights(3, rng), rng)
        result = agg.aggregate(rnd, updates)
        assert result.base_delta is None                                 # the training base never changes
        tail = agg.evaluation_base_delta()
        for mod in SHAPES3:
            star = ideal_dense(updates, mod)                             # dense float64 oracle
            sigma = np.linalg.svd(star, compute_uv=False)
            g = agg.evaluation_factors()[mod]
            assert g.rank == 3
            evaluated = product(g) + tail[mod].dense()
            np.testing.assert_allclose(evaluated, star, rtol=0, atol=1e-10 * np.linalg.norm(star))
            # the r_max adapter alone is the best rank-3 approximation, the tail is the rest
            assert np.linalg.norm(star - product(g)) == pytest.approx(np.sqrt(np.sum(sigma[3:] ** 2)), rel=1e-9)
            assert np.linalg.matrix_rank(tail[mod].dense()) == np.linalg.matrix_rank(star) - 3
            for cid, rank in enumerate(ranks):                           # clients: truncations only
                f = agg.plan(rnd + 1, cid).start[mod]
                assert np.linalg.norm(star - product(f)) == pytest.approx(np.sqrt(np.sum(sigma[rank:] ** 2)),
                                                                          rel=1e-9)


def test_deviation_rel_round_divides_by_the_increment_over_the_previous_global():
    ranks = (1, 2, 3)
    agg, init = make_aggregator("flexlora", ranks=ranks, shapes=SHAPES3, b_zero=False)
    rng = np.random.default_rng(3)
    previous = {mod: product(f) for mod, f in init.items()}              # the init adapter's ΔW
    for rnd in (1, 2, 3):
        weights = random_weights(3, rng)
        updates = make_updates(agg, rnd, [0, 1, 2], weights, rng)
        result = agg.aggregate(rnd, updates)
        num2 = den2 = inc2 = 0.0
        for mod in SHAPES3:
            star = ideal_dense(updates, mod)
            y, sigma, zt = np.linalg.svd(star)
            for w, r in zip(weights, ranks):                          # ‖ΔW* − best rank-r_k approximation‖²
                best = (y[:, :r] * sigma[:r]) @ zt[:r]
                num2 += w * np.linalg.norm(star - best) ** 2
            den2 += np.linalg.norm(star) ** 2
            inc2 += np.linalg.norm(star - previous[mod]) ** 2
            previous[mod] = star                                        # the next round's previous global
        assert result.deviation_rel == pytest.approx(np.sqrt(num2 / den2), rel=1e-9)
        assert result.deviation_rel_round == pytest.approx(np.sqrt(num2 / inc2), rel=1e-9)
        assert result.deviation_rel_round != pytest.approx(result.deviation_rel, rel=1e-3)


# 8 clients of ranks 2 and 3 (q = 20): every core has more than 2·r_max = 6 rows and columns, so only the top
# r_max triplets are computed, from the core's Gram matrix
GRAM_SHAPES = {"layer.wide": (30, 40), "layer.tall": (40, 18)}
GRAM_RANKS = (2, 3, 2, 3, 2, 3, 2, 3)


@pytest.mark.parametrize("lanczos_min_order", [10 ** 9, 0])            # LAPACK eigh, or Lanczos + check
@pytest.mark.parametrize("qr_weight", [float("inf"), 0.0])          # ΔW* dense, or QR of the stacks
def test_top_triplets_tails_and_deviation_match_a_dense_svd(monkeypatch, qr_weight, lanczos_min_order):
    monkeypatch.setattr(factors_module, "QR_WEIGHT", qr_weight)
    monkeypatch.setattr(flexlora, "LANCZOS_MIN_ORDER", lanczos_min_order)
    agg, _ = make_aggregator("flexlora", ranks=GRAM_RANKS, shapes=GRAM_SHAPES)
    rng = np.random.default_rng(11)
    previous = {mod: np.zeros(shape) for mod, shape in GRAM_SHAPES.items()}
    for rnd in (1, 2):
        weights = random_weights(len(GRAM_RANKS), rng)
        updates = make_updates(agg, rnd, list(range(len(GRAM_RANKS))), weights, rng)
        result = agg.aggregate(rnd, updates)
        num2 = den2 = inc2 = 0.0
        tail = agg.evaluation_base_delta()
        for mod in GRAM_SHAPES:
            star = ideal_dense(updates, mod)                                  # dense float64 oracle
            sigma = np.linalg.svd(star, compute_uv=False)
            np.testing.assert_allclose(agg.svd[mod][1], sigma[:3], rtol=1e-10)
            assert (tail[mod].v is None) == (qr_weight == float("inf"))      # dense where ΔW* was formed densely
            np.testing.assert_allclose(product(agg.evaluation_factors()[mod]) + tail[mod].dense(), star,
                                       rtol=0, atol=1e-10 * np.linalg.norm(star))
            for cid, rank in enumerate(GRAM_RANKS):
                f = agg.plan(rnd + 1, cid).start[mod]
                assert np.linalg.norm(star - product(f)) == pytest.approx(np.sqrt(np.sum(sigma[rank:] ** 2)),
                                                                          rel=1e-9)
            num2 += sum(w * np.sum(sigma[r:] ** 2) for w, r in zip(weights, GRAM_RANKS))
            den2 += np.sum(sigma ** 2)
            inc2 += np.linalg.norm(star - previous[mod]) ** 2
            previous[mod] = star
        assert result.deviation_rel == pytest.approx(np.sqrt(num2 / den2), rel=1e-9)
        if rnd == 2:                                                          # round 1: the init adapter (B = 0)
            assert result.deviation_rel_round == pytest.approx(np.sqrt(num2 / inc2), rel=1e-9)
        assert np.isnan(result.stats["svd_rank"])                             # only the top triplets were computed


def test_a_rank_deficient_aggregate_takes_the_full_svd():
    """ΔW* of rank 1 < r_max = 3 with large cores: the Gram matrix cannot resolve σ₂, σ₃ ≈ 0, the SVD does."""
    agg, _ = make_aggregator("flexlora", ranks=(3,) * 8, shapes=GRAM_SHAPES)
    rng = np.random.default_rng(12)
    updates = make_updates(agg, 1, list(range(8)), random_weights(8, rng), rng)
    for u in updates:                                                         # keep slot 0 only: rank 1 each
        for f in u.factors.values():
            f.b[:, 1:] = 0
            f.a[1:] = rng.normal(size=f.a[1:].shape)
        for mod, f in u.factors.items():
            f.a[0] = updates[0].factors[mod].a[0]                             # one shared row: rank(ΔW*) = 1
    result = agg.aggregate(1, updates)
    assert result.stats["svd_rank"] == 1.0 and result.stats["global_trunc_err_rel"] < 1e-12
    for mod, (m, n) in GRAM_SHAPES.items():
        star = ideal_dense(updates, mod)
        g = agg.global_factors[mod]
        assert np.linalg.norm(star - product(g)) < 1e-12 * np.linalg.norm(star)
        assert not np.any(g.b[:, 1:]) and np.all(np.abs(g.a[1:]).max(axis=1) > 0)   # dead slots: fresh A rows
    assert agg.evaluation_base_delta() is None


def test_checkpoints_that_kept_the_full_svd_still_load():
    """Older checkpoints stored (Y, σ, Z) of every singular triplet and no tail: the tail is cut from them."""
    agg, _ = make_aggregator("flexlora", ranks=(1, 2, 3), shapes=SHAPES3)
    rng = np.random.default_rng(13)
    updates = make_updates(agg, 1, [0, 1, 2], random_weights(3, rng), rng)
    agg.aggregate(1, updates)
    tensors, meta = agg.state_dict()
    full = {mod: thin_svd(*ideal_update([(u.weight, u.factors[mod]) for u in updates])) for mod in SHAPES3}
    old_tensors = {k: v for k, v in tensors.items() if not k.startswith(("svd", "tail"))}
    old_meta = {"global": {"global_factors": meta["global"]["global_factors"],
                           "svd": encode(full, "svd", old_tensors)}, "client": meta["client"]}
    restored, _ = make_aggregator("flexlora", ranks=(1, 2, 3), shapes=SHAPES3)
    restored.load_state_dict(old_tensors, old_meta)
    for mod in SHAPES3:
        star = ideal_dense(updates, mod)
        evaluated = product(restored.evaluation_factors()[mod]) + restored.evaluation_base_delta()[mod].dense()
        np.testing.assert_allclose(evaluated, star, rtol=0, atol=1e-10 * np.linalg.norm(star))
        assert restored.svd[mod][0].shape[1] == 3


def psd_with_spectrum(eigenvalues, rng):
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues, dtype=float)) @ q.T, q


@pytest.mark.parametrize("spectrum", ["flat", "repeated_top", "tie_at_the_cut"])
def test_top_eigenpairs_by_lanczos_match_a_dense_eigendecomposition(spectrum):
    rng = np.random.default_rng(5)
    lam = np.sort(rng.uniform(1, 1.1, size=120))[::-1]                    # flat: the hardest for Krylov methods
    if spectrum == "repeated_top":
        lam[:4] = 5.0                                                      # a fourfold top eigenvalue
    elif spectrum == "tie_at_the_cut":
        lam[6:9] = lam[7]                                                  # σ_7 = σ_8 = σ_9, r = 8
    gram, _ = psd_with_spectrum(lam, rng)
    got, vec = top_eigenpairs(gram, 8)
    want = np.linalg.eigvalsh(gram)[::-1][:8]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(gram @ vec, vec * got, atol=1e-12)          # eigenpairs, orthonormal vectors
    np.testing.assert_allclose(vec.T @ vec, np.eye(8), atol=1e-12)


def test_none_missed_rejects_pairs_that_skip_an_eigenvalue():
    rng = np.random.default_rng(6)
    lam = np.linspace(10, 1, 80)
    gram, q = psd_with_spectrum(lam, rng)
    assert none_missed(gram, lam[:5], q[:, :5])
    assert not none_missed(gram, lam[1:6], q[:, 1:6])                      # the largest one is missing
    assert not none_missed(gram, np.r_[lam[:4], lam[5]], q[:, [0, 1, 2, 3, 5]])   # the fifth one is missing
    assert not none_missed(np.zeros((80, 80)), np.zeros(5), q[:, :5])
