"""Factored norms and the deviation metric (docs/algorithms.md, "Deviation metric" and "Norms and SVDs of factored products")."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.lora import factors as F
from raysim.lora.factors import LoRAFactors, deviation, normalise_weights, product_fro_norm


def test_qr_and_dense_norms_agree(monkeypatch):
    rng = np.random.default_rng(0)
    p, m = rng.normal(size=(300, 12)), rng.normal(size=(12, 200))
    dense = np.linalg.norm(p @ m)
    monkeypatch.setattr(F, "QR_WEIGHT", 0.0)                 # force the QR path
    assert np.isclose(product_fro_norm(p, m), dense, rtol=1e-12)


def test_qr_norm_stays_accurate_when_the_product_nearly_cancels(monkeypatch):
    rng = np.random.default_rng(1)
    b, a = rng.normal(size=(300, 4)) * 1e3, rng.normal(size=(4, 200)) * 1e3
    eps = 1e-9
    # [b | -b·(1+eps)] · [a; a] = -eps·b·a: huge factors, tiny product
    p, m = np.concatenate([b, -b * (1 + eps)], axis=1), np.concatenate([a, a], axis=0)
    truth = eps * np.linalg.norm(b @ a)
    monkeypatch.setattr(F, "QR_WEIGHT", 0.0)
    assert abs(product_fro_norm(p, m) - truth) < 1e-3 * truth


def test_deviation_is_nan_when_nothing_trained():
    z = LoRAFactors(a=np.zeros((2, 5)), b=np.zeros((7, 2)), scale=1.0)
    rep = deviation({"q": [(1.0, z)]}, {"q": z}, None)
    assert np.isnan(rep.deviation_rel)


def test_deviation_counts_the_base_delta():
    rng = np.random.default_rng(2)
    f = LoRAFactors(a=rng.normal(size=(2, 5)), b=rng.normal(size=(7, 2)), scale=2.0)
    zero_global = LoRAFactors(a=f.a, b=np.zeros_like(f.b), scale=2.0)
    base = F.BaseDelta(u=2.0 * f.b, v=f.a)                     # everything folded into the base
    assert deviation({"q": [(1.0, f)]}, {"q": zero_global}, {"q": base}).deviation_rel < 1e-12
    assert np.isclose(deviation({"q": [(1.0, f)]}, {"q": zero_global}, None).deviation_rel, 1.0)


def test_weights_are_renormalised():
    np.testing.assert_allclose(normalise_weights([2, 6]), [0.25, 0.75])
    np.testing.assert_allclose(normalise_weights([20, 60]), normalise_weights([2, 6]))


def _client(rng, m, n, r, scale):
    return LoRAFactors(a=rng.normal(size=(r, n)), b=rng.normal(size=(m, r)), scale=scale)


@pytest.mark.parametrize("qr_weight", [float("inf"), 0.0])          # dense and QR paths
def test_deviation_of_several_clients_matches_a_dense_oracle(monkeypatch, qr_weight):
    """Three clients of ranks 1, 2, 3 and scales 4, 2, 4/3 on two modules; a new global of rank 3 plus a
    base delta; an old global: deviation_rel, deviation_rel_round and the per-module values, all dense."""
    monkeypatch.setattr(F, "QR_WEIGHT", qr_weight)
    rng = np.random.default_rng(3)
    shapes = {"q": (7, 5), "v": (6, 6)}
    p = [0.2, 0.5, 0.3]
    updates, new, old, base = {}, {}, {}, {}
    num2 = den2 = inc2 = 0.0
    per_module = {}
    for name, (m, n) in shapes.items():
        updates[name] = [(w, _client(rng, m, n, r, 4.0 / r)) for w, r in zip(p, (1, 2, 3))]
        new[name], old[name] = _client(rng, m, n, 3, 4 / 3), _client(rng, m, n, 3, 4 / 3)
        base[name] = F.BaseDelta(u=rng.normal(size=(m, 4)), v=rng.normal(size=(4, n)))
        star = sum(w * f.scale * f.b @ f.a for w, f in updates[name])
        d = star - (base[name].u @ base[name].v + new[name].scale * new[name].b @ new[name].a)
        inc = star - old[name].scale * old[name].b @ old[name].a
        num2 += np.sum(d ** 2)
        den2 += np.sum(star ** 2)
        inc2 += np.sum(inc ** 2)
        per_module[name] = np.linalg.norm(d) / np.linalg.norm(star)
    rep = deviation(updates, new, base, old)
    assert rep.deviation_rel == pytest.approx(np.sqrt(num2 / den2), rel=1e-10)
    assert rep.deviation_rel_round == pytest.approx(np.sqrt(num2 / inc2), rel=1e-10)
    assert rep.per_module == pytest.approx(per_module, rel=1e-10)
    no_old = deviation(updates, new, base)                            # without an old global: ΔW* itself
    assert no_old.deviation_rel_round == pytest.approx(np.sqrt(num2 / den2), rel=1e-10)


def test_deviation_of_an_exact_multi_client_update_is_round_off():
    """Global = the first client's factors, base delta = the stacked rest: D = 0 while ‖ΔW*‖ is O(1)."""
    rng = np.random.default_rng(4)
    ups = [(w, _client(rng, 7, 5, 2, 2.0)) for w in (0.25, 0.25, 0.5)]
    w0, f0 = ups[0]
    glob = LoRAFactors(a=f0.a, b=w0 * f0.b, scale=f0.scale)
    rest = F.BaseDelta(u=np.concatenate([w * f.scale * f.b for w, f in ups[1:]], axis=1),
                       v=np.concatenate([f.a for _, f in ups[1:]], axis=0))
    assert deviation({"q": ups}, {"q": glob}, {"q": rest}).deviation_rel < 1e-13


def test_ideal_update_leaves_weightless_clients_out_of_the_stack():
    rng = np.random.default_rng(5)
    ups = [(0.5, _client(rng, 7, 5, 2, 2.0)), (0.0, _client(rng, 7, 5, 4, 1.0)), (0.5, _client(rng, 7, 5, 2, 2.0))]
    u, v = F.ideal_update(ups)
    assert u.shape == (7, 4) and v.shape == (4, 5)                  # q = 2 + 2: the weightless rank 4 is not sent
    star = sum(w * f.scale * f.b @ f.a for w, f in ups)
    np.testing.assert_allclose(u @ v, star, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qr_weight", [float("inf"), 0.0])          # dense and QR paths
def test_sum_norms_of_several_combinations_match_dense_sums(monkeypatch, qr_weight):
    """Every combination of the terms, a term repeated (merged, its coefficients add up) and one whose
    coefficients cancel; a dense term (R None) takes the dense path whatever the cost rule says."""
    monkeypatch.setattr(F, "QR_WEIGHT", qr_weight)
    rng = np.random.default_rng(6)
    m, n = 30, 20
    terms = [(rng.normal(size=(m, q)), rng.normal(size=(q, n))) for q in (5, 2, 3)]
    terms.append((terms[0][0].copy(), terms[0][1].copy()))             # equal to the first term
    dense = [l @ r for l, r in terms]
    combos = [[1, 0, 0, 0], [1, -1, 0.5, 0], [1, 0, 0, -1], [2, 1, -1, 1], [0, 0, 0, 0]]
    got = F.sum_norms(terms, combos)
    for c, value in zip(combos, got):
        assert value == pytest.approx(np.linalg.norm(sum(k * d for k, d in zip(c, dense))), rel=1e-12, abs=1e-12)
    assert got[2] == 0.0                                                # the equal terms cancel exactly
    with_dense = F.sum_norms([terms[0], (dense[1], None)], [[1, -1], [0, 1]])
    assert with_dense == pytest.approx([np.linalg.norm(dense[0] - dense[1]), np.linalg.norm(dense[1])], rel=1e-12)
    assert terms[0][0].shape == (m, 5) and np.array_equal(dense[1], terms[1][0] @ terms[1][1])   # inputs untouched


def test_cost_rule_picks_the_cheaper_form():
    assert F.prefer_dense(768, 768, 1600) and F.prefer_dense(768, 768, 200)
    assert not F.prefer_dense(768, 768, 100) and not F.prefer_dense(4096, 4096, 64)


def test_sandwich_norms_match_dense_products():
    rng = np.random.default_rng(7)
    left, mid, right = rng.normal(size=(4, 9, 3)), rng.normal(size=(4, 3, 3)), rng.normal(size=(4, 3, 11))
    gl, gr = F.grams(left, "left"), F.grams(right, "right")
    np.testing.assert_allclose(F.sandwich_norms(gl, gr), [np.linalg.norm(l @ r) for l, r in zip(left, right)],
                               rtol=1e-12)
    np.testing.assert_allclose(F.sandwich_norms(gl, gr, mid),
                               [np.linalg.norm(l @ c @ r) for l, c, r in zip(left, mid, right)], rtol=1e-12)
    shift = rng.normal(size=(3, 11))
    np.testing.assert_allclose(F.grams(list(right), "right", minus_from=shift, chunk=3),
                               [(shift - r) @ (shift - r).T for r in right], rtol=1e-12)   # chunks of 3, then 1
    assert F.stacked([np.ones((2, 2), np.float32)] * 3).dtype == np.float64


def test_ideal_update_fills_lent_buffers_with_the_same_values():
    rng = np.random.default_rng(8)
    ups = [(w, _client(rng, 7, 5, r, 4.0 / r)) for w, r in ((0.3, 1), (0.7, 2))]
    buffers = {}
    u, v = F.ideal_update(ups, buffers)
    u_plain, v_plain = F.ideal_update(ups)
    assert np.array_equal(u, u_plain) and np.array_equal(v, v_plain)
    u2, _ = F.ideal_update([(w, _client(rng, 7, 5, r, 1.0)) for w, r in ((0.5, 1), (0.5, 2))], buffers)
    assert u2 is u                                                     # same shapes: the same arrays again
    np.testing.assert_allclose(u_plain @ v_plain, sum(w * f.scale * f.b @ f.a for w, f in ups), rtol=1e-12)


def test_base_delta_is_stored_in_its_smaller_form():
    rng = np.random.default_rng(9)
    u, v = rng.normal(size=(6, 4)), rng.normal(size=(4, 5))               # 4·11 = 44 > 30: dense
    d = F.compact_delta(u, v)
    assert d.v is None and d.numel() == 30 and d.shape == (6, 5)
    np.testing.assert_allclose(d.dense(), u @ v, rtol=1e-12)
    small = F.compact_delta(u[:, :1], v[:1])                             # 11 < 30: factored, as given
    assert small.v is not None and small.numel() == 11
    np.testing.assert_array_equal(F.delta_matrix(small.u, small.v), u[:, :1] @ v[:1])
