"""CE-LoRA (raysim/aggregators/celora.py): personalised weights and C-only exchange (docs/algorithms.md, CE-LoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raysim.aggregators.base import ClientData, ClientUpdate
from raysim.aggregators.celora import label_descriptor, personal_weights

from .helpers import RANK, SHAPES, make_aggregator, random_weights, train

ONLY_C = frozenset({"c"})


def celora(params=None, k=6):
    return make_aggregator("celora", params, ranks=(RANK,) * k)


def round_of(agg, rnd, cids, weights, rng, descriptors=None, noise=0.5):
    """Plan, "train" (random steps on the trained factors) and wrap as updates with descriptors."""
    updates = []
    for i, (cid, w) in enumerate(zip(cids, weights)):
        plan = agg.plan(rnd, cid)
        d = None if descriptors is None or plan.client_hook is None else descriptors[i]
        updates.append(ClientUpdate(cid, float(w), 10, train(plan, rng, noise), hook_output=d))
    return updates


def test_init_shared_frame_zero_core_and_c_only_exchange():
    agg, _ = celora()
    plans = [agg.plan(1, cid) for cid in range(3)]
    for plan in plans:
        assert plan.upload == plan.download == ONLY_C
        assert plan.train == frozenset({"a", "b", "c"})
        assert plan.lr_scale == {"a": 0.1, "b": 0.1}
        assert plan.client_hook is label_descriptor                    # the descriptor goes up once
        assert plan.once == {"seed": 1}                                # the frame's seed: the ledger charges it once
    for mod in SHAPES:
        f0 = plans[0].start[mod]
        assert not f0.c.any() and f0.b.any() and f0.a.any()            # ΔW = 0, but C has a gradient
        for plan in plans[1:]:                                         # one frame for every client
            assert np.array_equal(plan.start[mod].a, f0.a) and np.array_equal(plan.start[mod].b, f0.b)
    assert not make_aggregator("celora", {"train_ab": False})[0].plan(1, 0).train - ONLY_C


def test_upload_is_r_squared_per_module():
    agg, _ = celora()
    plan = agg.plan(1, 0)
    assert sum(f.numel(tuple(plan.upload)) for f in plan.start.values()) == RANK * RANK * len(SHAPES)
    assert sum(f.numel(tuple(plan.download)) for f in plan.start.values()) == RANK * RANK * len(SHAPES)


def test_weight_rows_sum_to_one_and_permutation_equivariance():
    rng = np.random.default_rng(0)
    desc = [rng.dirichlet(np.ones(5)) for _ in range(5)]
    deltas = [rng.normal(size=12) for _ in range(5)]
    prior = np.log(random_weights(5, rng))
    w = personal_weights(desc, deltas, 5.0, 0.5, prior)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (w > 0).all()
    perm = rng.permutation(5)
    wp = personal_weights([desc[i] for i in perm], [deltas[i] for i in perm], 5.0, 0.5, prior[perm])
    np.testing.assert_allclose(wp, w[np.ix_(perm, perm)], rtol=1e-12)


def test_uniform_weights_for_identical_clients_and_for_tau_zero():
    rng = np.random.default_rng(1)
    d, delta = rng.dirichlet(np.ones(4)), rng.normal(size=10)
    np.testing.assert_allclose(personal_weights([d] * 4, [delta] * 4, 5.0, 0.5), 0.25, rtol=1e-12)
    desc = [rng.dirichlet(np.ones(4)) for _ in range(4)]
    deltas = [rng.normal(size=10) for _ in range(4)]
    np.testing.assert_allclose(personal_weights(desc, deltas, 0.0, 0.5), 0.25, rtol=1e-12)

    # end to end: identical uploads and descriptors give w_kj = 1/K and every C_k = the plain average
    agg, _ = celora(k=4)
    up = round_of(agg, 1, [0], [1.0], rng, [d])[0]
    updates = [ClientUpdate(cid, 0.25, 10, {m: f.copy() for m, f in up.factors.items()}, hook_output=d)
               for cid in range(4)]
    result = agg.aggregate(1, updates)
    np.testing.assert_allclose(agg.last_weights, 0.25, rtol=1e-12)
    assert result.stats["weight_entropy_rel"] == pytest.approx(1.0)
    assert result.stats["self_weight_mean"] == pytest.approx(0.25)
    assert result.stats["descriptors_received"] == 4


def test_beta_one_ignores_the_parameter_updates():
    rng = np.random.default_rng(2)
    desc = [rng.dirichlet(np.ones(4)) for _ in range(4)]
    w1 = personal_weights(desc, [rng.normal(size=10) for _ in range(4)], 5.0, 1.0)
    w2 = personal_weights(desc, [rng.normal(size=10) for _ in range(4)], 5.0, 1.0)
    np.testing.assert_array_equal(w1, w2)
    assert not np.allclose(w1, 0.25)


def test_two_groups_concentrate_their_weight_on_their_own_group():
    """Clients 0–2 hold labels {0, 1}, clients 3–5 labels {2, 3}; their C updates point two ways."""
    agg, _ = celora()
    rng = np.random.default_rng(3)
    direction = {g: {m: rng.normal(size=(RANK, RANK)) for m in SHAPES} for g in range(2)}
    updates = []
    for cid in range(6):
        g = cid // 3
        labels = rng.integers(2 * g, 2 * g + 2, size=40)
        plan = agg.plan(1, cid)
        factors = {m: f.copy() for m, f in plan.start.items()}
        for m, f in factors.items():
            f.c = f.c + direction[g][m] + 0.3 * rng.normal(size=f.c.shape)
        updates.append(ClientUpdate(cid, 1 / 6, 40, factors, hook_output=label_descriptor(ClientData(labels, 4))))
    agg.aggregate(1, updates)
    w = agg.last_weights
    for k in range(6):
        own = slice(0, 3) if k < 3 else slice(3, 6)
        assert w[k, own].sum() > 0.95
    # and the personalised cores follow: each C_k is close to its own group's mean
    for k in range(6):
        group = [u for u in updates if u.client_id // 3 == k // 3]
        for m in SHAPES:
            mean = np.mean([u.factors[m].c for u in group], axis=0)
            other = np.mean([u.factors[m].c for u in updates if u not in group], axis=0)
            ck = agg.plan(2, k).start[m].c
            assert np.linalg.norm(ck - mean) < 0.2 * np.linalg.norm(ck - other)


def test_frozen_frame_with_uniform_weights_applies_the_exact_average():
    """train_ab: false and τ = 0: every participant's next ΔW = Σ_j (1/K)·s·B·C_j·A."""
    agg, _ = celora({"train_ab": False, "tau": 0.0}, k=4)
    rng = np.random.default_rng(4)
    cids = [0, 1, 3]
    updates = round_of(agg, 1, cids, random_weights(3, rng), rng, [rng.dirichlet(np.ones(3)) for _ in cids])
    agg.aggregate(1, updates)
    for cid in cids:
        nxt = agg.plan(2, cid).start
        for m in SHAPES:
            expected = sum(u.factors[m].scale * u.factors[m].b @ u.factors[m].c @ u.factors[m].a
                           for u in updates) / 3
            np.testing.assert_allclose(nxt[m].product(), expected, rtol=1e-10, atol=1e-12)
    never = agg.plan(2, 2).start                                # not sampled: still C = 0, ΔW = 0
    assert all(not f.c.any() for f in never.values())


def test_local_ab_persist_and_global_model_is_the_frame_with_the_average_core():
    agg, _ = celora()
    rng = np.random.default_rng(5)
    weights = random_weights(3, rng)
    frame = {m: (f.a.copy(), f.b.copy()) for m, f in agg.plan(1, 5).start.items()}
    updates = round_of(agg, 1, [0, 1, 2], weights, rng, [rng.dirichlet(np.ones(3)) for _ in range(3)])
    agg.aggregate(1, updates)
    for u in updates:
        plan = agg.plan(2, u.client_id)
        assert plan.client_hook is None
        for m in SHAPES:                                          # the client's own A_k, B_k, as trained
            assert np.array_equal(plan.start[m].a, u.factors[m].a)
            assert np.array_equal(plan.start[m].b, u.factors[m].b)
    ev = agg.evaluation_factors()
    for m in SHAPES:
        c_bar = sum(w * u.factors[m].c for w, u in zip(weights, updates))
        assert ev[m].c is None                                    # exported as plain LoRA: b ← b·C̄
        np.testing.assert_allclose(ev[m].product(), frame[m][1] @ c_bar @ frame[m][0] * ev[m].scale,
                                   rtol=1e-10, atol=1e-12)


def test_prior_and_descriptor_noise():
    rng = np.random.default_rng(6)
    desc = [rng.dirichlet(np.ones(4)) for _ in range(3)]
    deltas = [rng.normal(size=8) for _ in range(3)]
    p = np.array([0.2, 0.3, 0.5])
    base = personal_weights(desc, deltas, 5.0, 0.5)
    with_prior = personal_weights(desc, deltas, 5.0, 0.5, np.log(p))
    expected = base * p[None, :]
    np.testing.assert_allclose(with_prior, expected / expected.sum(axis=1, keepdims=True), rtol=1e-12)

    d = label_descriptor(ClientData(np.array([0, 0, 1, 2]), 4))
    np.testing.assert_allclose(d, [0.5, 0.25, 0.25, 0.0])
    stored = {}
    for noise in (0.1, 0.2):
        agg, _ = celora({"descriptor_noise": noise}, k=3)
        agg.aggregate(1, round_of(agg, 1, [0, 1, 2], [1 / 3] * 3, np.random.default_rng(6), [d] * 3))
        stored[noise] = {cid: agg.descriptors[cid] - d for cid in range(3)}
    for cid in range(3):       # one fixed Gaussian draw per (seed, client), scaled by descriptor_noise
        assert np.any(stored[0.1][cid])
        np.testing.assert_allclose(stored[0.2][cid], 2 * stored[0.1][cid], rtol=1e-12)
    assert not np.allclose(stored[0.1][0], stored[0.1][1])


def test_client_state_survives_a_checkpoint():
    agg, _ = celora()
    rng = np.random.default_rng(7)
    agg.aggregate(1, round_of(agg, 1, [1, 4], [0.5, 0.5], rng, [rng.dirichlet(np.ones(3)) for _ in range(2)]))
    tensors, meta = agg.state_dict()
    restored, _ = celora()
    restored.load_state_dict(dict(tensors), json.loads(json.dumps(meta)))
    for cid in range(6):
        a, b = agg.plan(2, cid), restored.plan(2, cid)
        assert (a.client_hook, a.once) == (b.client_hook, b.once)
        for m in SHAPES:
            for part in ("a", "b", "c"):
                assert np.array_equal(getattr(a.start[m], part), getattr(b.start[m], part))
    for m in SHAPES:
        assert np.array_equal(agg.evaluation_factors()[m].b, restored.evaluation_factors()[m].b)


def softmax_rows_oracle(desc, deltas, tau, beta):
    """w_kj = softmax_j τ(β cos(d_k, d_j) + (1 − β) cos(ΔC_k, ΔC_j)), written out in float64."""
    k = len(deltas)
    z = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            cd = np.dot(desc[i], desc[j]) / (np.linalg.norm(desc[i]) * np.linalg.norm(desc[j]))
            cp = np.dot(deltas[i], deltas[j]) / (np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]))
            z[i, j] = tau * (beta * cd + (1 - beta) * cp)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_second_round_mixes_by_the_change_of_c_not_by_c(beta):
    """From C_k ≠ 0 (after round 1) the similarity uses ΔC_k = C_k(after) − C_k(sent); C_k ← Σ_j w_kj C_j."""
    agg, _ = celora({"tau": 5.0, "beta": beta}, k=4)
    rng = np.random.default_rng(8)
    desc = [rng.dirichlet(np.ones(4)) for _ in range(4)]
    agg.aggregate(1, round_of(agg, 1, [0, 1, 2, 3], [0.25] * 4, rng, desc))
    sent = {cid: {m: agg.plan(2, cid).start[m].c.copy() for m in SHAPES} for cid in range(4)}
    assert all(np.any(c) for cs in sent.values() for c in cs.values())           # C ≠ 0 from here on
    updates = round_of(agg, 2, [0, 1, 2, 3], random_weights(4, rng), rng, noise=0.3)
    agg.aggregate(2, updates)
    flat = (lambda cs: np.concatenate([cs[m].ravel() for m in SHAPES]))
    deltas = [flat({m: u.factors[m].c - sent[u.client_id][m] for m in SHAPES}) for u in updates]
    w = softmax_rows_oracle(desc, deltas, 5.0, beta)
    np.testing.assert_allclose(agg.last_weights, w, rtol=1e-10)
    with_c = softmax_rows_oracle(desc, [flat({m: u.factors[m].c for m in SHAPES}) for u in updates], 5.0, beta)
    assert not np.allclose(with_c, w, rtol=1e-3)                   # C instead of ΔC would be caught
    for k, u in enumerate(updates):
        for m in SHAPES:
            expected = sum(w[k, j] * v.factors[m].c for j, v in enumerate(updates))
            np.testing.assert_allclose(agg.plan(3, u.client_id).start[m].c, expected, rtol=1e-10, atol=1e-14)


def test_mixing_drift_statistic():
    """δ_k = ‖s·B_k·(C_k(mixed) − C_k(after))·A_k‖_F / ‖s·B_k·C_k(after)·A_k‖_F over all modules."""
    agg, _ = celora(k=3)
    rng = np.random.default_rng(9)
    weights = np.array([0.2, 0.3, 0.5])
    updates = round_of(agg, 1, [0, 1, 2], weights, rng, [rng.dirichlet(np.ones(3)) for _ in range(3)])
    result = agg.aggregate(1, updates)
    drifts = []
    for u in updates:
        num2 = den2 = 0.0
        for m in SHAPES:
            f = u.factors[m]
            mixed = agg.plan(2, u.client_id).start[m].c
            num2 += np.linalg.norm(f.scale * f.b @ (mixed - f.c) @ f.a) ** 2
            den2 += np.linalg.norm(f.scale * f.b @ f.c @ f.a) ** 2
        drifts.append(np.sqrt(num2 / den2))
    assert result.stats["broadcast_drift_mean"] == pytest.approx(np.dot(weights, drifts), rel=1e-10)
    assert result.stats["broadcast_drift_max"] == pytest.approx(max(drifts), rel=1e-10)
    assert min(drifts) > 0
