"""LoRA-FAIR (raysim/aggregators/lora_fair.py): corrected B̄ per module (docs/algorithms.md, LoRA-FAIR)."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.aggregators.lora_fair import FairProblem
from raysim.lora.factors import ideal_update

from .helpers import (SHAPES, dense_deviation_rel, ideal_dense, make_aggregator, make_updates, product,
                      random_weights)

SOLVERS = [{"solver": "adam"}, {"solver": "adam", "lam": 0.0}, {"solver": "ls"},
           {"solver": "ls_ridge", "mu": 0.0}, {"solver": "ls_ridge", "mu": 0.05}]


def problem(seed=0, identical=False, k=3):
    """(updates, weights) of one random round with K clients of rank 2 from a non-zero B init."""
    agg, _ = make_aggregator("fedit", b_zero=False)
    rng = np.random.default_rng(seed)
    weights = random_weights(k, rng)
    return make_updates(agg, 1, list(range(k)), weights, rng, identical=identical), weights


def run(params, updates):
    agg, _ = make_aggregator("lora_fair", params, b_zero=False)
    result = agg.aggregate(1, updates)
    return agg, result


def means(updates, weights, mod):
    """(Ā, B̄) with B̄ = Σ p_k B̃_k / s."""
    scale = updates[0].factors[mod].scale
    a_bar = sum(w * u.factors[mod].a for w, u in zip(weights, updates))
    b_bar = sum(w * u.factors[mod].b_tilde() for w, u in zip(weights, updates)) / scale
    return a_bar, b_bar


def cos(x, y):
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def delta_b(agg, updates, weights, mod):
    return agg.global_factors[mod].b - means(updates, weights, mod)[1]


@pytest.mark.parametrize("params", SOLVERS)
def test_cosine_never_decreases_and_a_is_the_mean(params):
    for seed in range(3):
        updates, weights = problem(seed)
        agg, result = run(params, updates)
        for mod in SHAPES:
            a_bar, b_bar = means(updates, weights, mod)
            star = ideal_dense(updates, mod)
            g = agg.global_factors[mod]
            np.testing.assert_allclose(g.a, a_bar, rtol=1e-12, atol=1e-15)
            before = cos(star, g.scale * b_bar @ a_bar)
            after = cos(star, product(g))
            assert after >= before - 1e-12
            if params.get("lam", 0.01) > 0 or params["solver"] != "adam":
                assert after > before                                  # random clients: strictly better
        assert result.stats["cos_after"] >= result.stats["cos_before"]
        assert result.stats["delta_b_rel"] > 0


def test_stats_match_dense_values():
    updates, weights = problem(3)
    agg, result = run({"solver": "ls"}, updates)
    befores, afters, rels = [], [], []
    for mod in SHAPES:
        a_bar, b_bar = means(updates, weights, mod)
        star = ideal_dense(updates, mod)
        befores.append(cos(star, agg.global_factors[mod].scale * b_bar @ a_bar))
        afters.append(cos(star, product(agg.global_factors[mod])))
        rels.append(np.linalg.norm(delta_b(agg, updates, weights, mod)) / np.linalg.norm(b_bar))
    assert result.stats["cos_before"] == pytest.approx(np.mean(befores), rel=1e-10)
    assert result.stats["cos_after"] == pytest.approx(np.mean(afters), rel=1e-10)
    assert result.stats["delta_b_rel"] == pytest.approx(np.mean(rels), rel=1e-8)


def test_ls_attains_the_projection_cosine_and_beats_fedit():
    updates, weights = problem(4)
    agg, result = run({"solver": "ls"}, updates)
    fedit, _ = make_aggregator("fedit", b_zero=False)
    fedit_result = fedit.aggregate(1, updates)
    rng = np.random.default_rng(0)
    for mod in SHAPES:
        a_bar, _ = means(updates, weights, mod)
        star = ideal_dense(updates, mod)
        proj = a_bar.T @ np.linalg.solve(a_bar @ a_bar.T, a_bar)               # Π_Ā (n, n)
        target = np.linalg.norm(star @ proj) / np.linalg.norm(star)
        g = agg.global_factors[mod]
        assert cos(star, product(g)) == pytest.approx(target, rel=1e-8)
        for _ in range(20):                                                    # not beaten nearby
            b = g.b + 1e-3 * np.linalg.norm(g.b) * rng.normal(size=g.b.shape)
            assert cos(star, g.scale * b @ g.a) <= target + 1e-12
    dev_ls = dense_deviation_rel(updates, agg, None)
    dev_fedit = dense_deviation_rel(updates, fedit, fedit_result.base_delta)
    assert dev_ls <= dev_fedit + 1e-7


def test_lambda_changes_the_adam_correction():
    updates, weights = problem(5)
    agg0, _ = run({"solver": "adam", "lam": 0.0}, updates)
    agg1, _ = run({"solver": "adam", "lam": 0.01}, updates)
    for mod in SHAPES:
        d0 = delta_b(agg0, updates, weights, mod)
        d1 = delta_b(agg1, updates, weights, mod)
        assert np.linalg.norm(d0 - d1) > 1e-6 * np.linalg.norm(d0)


@pytest.mark.parametrize("lam, zero_modules", [(0.01, 0), (1e3, len(SHAPES))])
def test_modules_that_kept_a_zero_correction_are_counted(lam, zero_modules):
    """With λ far above the cosine's gradient no Adam iterate beats ΔB = 0: B_g = B̄ on every module."""
    updates, weights = problem(11)
    agg, result = run({"solver": "adam", "lam": lam}, updates)
    kept = [mod for mod in SHAPES if np.array_equal(agg.global_factors[mod].b, means(updates, weights, mod)[1])]
    assert len(kept) == zero_modules
    assert result.stats["modules_delta_b_zero"] == zero_modules
    assert result.stats["modules_skipped"] == 0


@pytest.mark.parametrize("params", SOLVERS)
def test_identical_clients_need_no_correction(params):
    updates, weights = problem(6, identical=True)
    agg, _ = run(params, updates)
    for mod in SHAPES:
        _, b_bar = means(updates, weights, mod)
        assert np.linalg.norm(delta_b(agg, updates, weights, mod)) <= 1e-10 * np.linalg.norm(b_bar)


def test_ridge_shrinks_monotonically_and_equals_ls_at_zero():
    updates, weights = problem(7)
    ls, _ = run({"solver": "ls"}, updates)
    norms = {mod: [] for mod in SHAPES}
    for mu in (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0):
        agg, _ = run({"solver": "ls_ridge", "mu": mu}, updates)
        for mod in SHAPES:
            if mu == 0.0:
                assert np.array_equal(agg.global_factors[mod].b, ls.global_factors[mod].b)
            norms[mod].append(np.linalg.norm(delta_b(agg, updates, weights, mod)))
    for mod, ns in norms.items():
        assert all(b <= a * (1 + 1e-12) for a, b in zip(ns, ns[1:])), ns


@pytest.mark.parametrize("solver", ["adam", "ls"])
def test_each_module_is_corrected_on_its_own(solver):
    updates, _ = problem(8)
    other, _ = problem(9)
    for u, o in zip(updates, other):                     # same "layer.q" and p, different "layer.v"
        o.factors["layer.q"] = u.factors["layer.q"]
        o.weight = u.weight
    agg1, _ = run({"solver": solver}, updates)
    agg2, _ = run({"solver": solver}, other)
    assert np.array_equal(agg1.global_factors["layer.q"].b, agg2.global_factors["layer.q"].b)
    assert not np.array_equal(agg1.global_factors["layer.v"].b, agg2.global_factors["layer.v"].b)


def test_analytic_gradient_and_best_iterate():
    updates, weights = problem(10)
    mod = "layer.q"
    a_bar, b_bar = means(updates, weights, mod)
    u, v = ideal_update([(w, up.factors[mod]) for w, up in zip(weights, updates)])
    prob = FairProblem(u, v, a_bar, b_bar, updates[0].factors[mod].scale)
    rng = np.random.default_rng(1)
    db = 0.1 * rng.normal(size=b_bar.shape)
    _, grad = prob.value_and_grad(db, 0.01)
    h = 1e-6
    numeric = np.zeros_like(db)
    for idx in np.ndindex(db.shape):
        e = np.zeros_like(db)
        e[idx] = h
        numeric[idx] = (prob.value_and_grad(db + e, 0.01)[0] - prob.value_and_grad(db - e, 0.01)[0]) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    best = prob.solve_adam(0.01, 200, 0.01 * np.sqrt(np.mean(b_bar ** 2)))
    assert prob.value_and_grad(best, 0.01)[0] <= prob.value_and_grad(np.zeros_like(db), 0.01)[0]
    dense_cos = cos(ideal_dense(updates, mod), prob.scale * (b_bar + db) @ a_bar)
    assert prob.cos(db) == pytest.approx(dense_cos, rel=1e-12)


def dense_adam(star, a_bar, b_bar, scale, lam, steps, lr):
    """Oracle: Adam on f(ΔB) = 1 − cos(ΔW*, s(B̄+ΔB)Ā) + λ‖ΔB‖_F with dense m×n matrices; best iterate kept."""
    def f_and_grad(db):
        y = scale * (b_bar + db) @ a_bar
        xn, yn = np.linalg.norm(star), np.linalg.norm(y)
        inner = np.sum(star * y)
        grad_y = -(star / (xn * yn) - inner / (xn * yn ** 3) * y)
        grad = scale * grad_y @ a_bar.T
        norm = np.linalg.norm(db)
        if norm > 0:
            grad = grad + lam * db / norm
        return 1 - inner / (xn * yn) + lam * norm, grad

    db, m1, m2 = np.zeros_like(b_bar), np.zeros_like(b_bar), np.zeros_like(b_bar)
    best_val, grad = f_and_grad(db)
    best = db.copy()
    for t in range(1, steps + 1):
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad * grad
        db = db - lr * (m1 / (1 - 0.9 ** t)) / (np.sqrt(m2 / (1 - 0.999 ** t)) + 1e-8)
        val, grad = f_and_grad(db)
        if val < best_val:
            best_val, best = val, db.copy()
    return best


def test_adam_runs_once_for_all_modules_of_a_shape_and_matches_a_dense_oracle():
    shapes = {"layer.q": (7, 5), "layer.k": (7, 5), "layer.v": (6, 6)}      # q and k share one vectorised Adam
    agg, _ = make_aggregator("lora_fair", {"steps": 60}, shapes=shapes, b_zero=False)
    rng = np.random.default_rng(14)
    weights = random_weights(3, rng)
    updates = make_updates(agg, 1, [0, 1, 2], weights, rng)
    agg.aggregate(1, updates)
    for mod in shapes:
        a_bar, b_bar = means(updates, weights, mod)
        scale = updates[0].factors[mod].scale
        best = dense_adam(ideal_dense(updates, mod), a_bar, b_bar, scale, 0.01, 60,
                          0.01 * np.sqrt(np.mean(b_bar ** 2)))
        assert best.any()
        np.testing.assert_allclose(agg.global_factors[mod].b, b_bar + best, rtol=1e-9, atol=1e-12)
