"""The coordinator's state owners, built directly (no Ray): heads, base-delta log, ledger, faults, records."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.aggregators.base import ClientPlan
from raysim.base_log import BaseDeltaLog
from raysim.config import FaultsConfig
from raysim.engines.base import ClientFault, ClientJob
from raysim.faults import FaultInjector, apply_faults
from raysim.heads import HeadState
from raysim.ledger import CommLedger
from raysim.lora.factors import BaseDelta, LoRAFactors
from raysim.records import frozen_changed

HEAD = {"classifier.weight": np.zeros((2, 3), np.float32)}


def test_a_local_head_starts_from_the_clients_own_head():
    heads = HeadState(HEAD, "local", trained=True)
    heads.update({1: {"classifier.weight": np.full((2, 3), 7.0)}}, {1: 1.0})
    assert heads.start_for(1)["classifier.weight"][0, 0] == 7.0     # its own head from its last round
    assert heads.start_for(2) is heads.initial                     # never trained: the initial head
    assert heads.numel_on_wire() == 0                               # nothing on the wire


@pytest.mark.parametrize("trained,numel", [(True, 6), (False, 0)])
def test_a_fedavg_head_is_the_weighted_mean_of_the_clients(trained, numel):
    heads = HeadState(HEAD, "fedavg", trained=trained)
    heads.update({1: {"classifier.weight": np.full((2, 3), 1.0)}, 2: {"classifier.weight": np.full((2, 3), 4.0)}},
                 {1: 2 / 3, 2: 1 / 3})
    assert heads.start_for(1) is heads.global_head and heads.start_for(2) is heads.global_head
    assert heads.global_head["classifier.weight"][1, 2] == pytest.approx(2.0 if trained else 0.0)
    assert heads.numel_on_wire() == numel


def test_head_state_round_trips():
    heads = HeadState(HEAD, "local", trained=True)
    heads.update({3: {"classifier.weight": np.full((2, 3), 5.0)}}, {3: 1.0})
    again = HeadState(HEAD, "local", trained=True)
    again.load_state_dict(*heads.state_dict())
    assert np.array_equal(again.client_heads[3]["classifier.weight"], heads.client_heads[3]["classifier.weight"])
    assert np.array_equal(again.global_head["classifier.weight"], heads.global_head["classifier.weight"])


def _delta(rng, m, n, q):
    return BaseDelta(rng.standard_normal((m, q)), rng.standard_normal((q, n)))


def test_base_log_replays_the_missed_versions_and_sums_them():
    rng = np.random.default_rng(0)
    log = BaseDeltaLog()
    d1, d3 = _delta(rng, 6, 5, 1), _delta(rng, 6, 5, 2)
    log.record(1, {"q": d1})
    log.record(3, {"q": d3})
    assert log.version == 3 and [v for v, _ in log.since(1)] == [3]
    np.testing.assert_allclose(log.cumulative()["q"], d1.u @ d1.v + d3.u @ d3.v)
    again = BaseDeltaLog()
    again.load_state_dict(*log.state_dict())
    np.testing.assert_array_equal(again.cumulative()["q"], log.cumulative()["q"])


def test_ledger_charges_catch_up_without_side_effects():
    rng = np.random.default_rng(1)
    log = BaseDeltaLog()
    log.record(1, {"q": _delta(rng, 6, 5, 1)})       # 11 scalars factored
    log.record(2, {"q": _delta(rng, 6, 5, 4)})       # 44 factored > 30 dense: charged 30
    f = LoRAFactors(a=np.zeros((2, 5), np.float32), b=np.zeros((6, 2), np.float32), scale=1.0)
    plan = ClientPlan(start={"q": f})
    ledger = CommLedger(num_clients=3, module_shapes={"q": (6, 5)}, head_numel=7)
    first = ledger.download_numel(0, plan, log)
    assert first == 22 + 7 + min(30, 11 + 30)
    assert ledger.download_numel(0, plan, log) == first               # a query: asking twice costs the same
    ledger.mark_synced([0], log.version)
    assert ledger.download_numel(0, plan, log) == 22 + 7               # synced: factors and head only
    assert ledger.upload_numel(plan, np.ones(4)) == 22 + 7 + 4          # + what a client hook returned


def test_faults_are_drawn_per_round_and_client_and_applied_before_training():
    injector = FaultInjector(FaultsConfig(drop_rate=0.5, slow_fraction=0.0), seed=3)
    draws = [injector.for_client(1, c).drop for c in range(200)]
    assert 60 < sum(draws) < 140
    assert draws == [FaultInjector(FaultsConfig(drop_rate=0.5), seed=3).for_client(1, c).drop for c in range(200)]
    jobs = [ClientJob(client_id=c, round=1, seed=c, train_idx=np.arange(4), test_idx=None, start={}, head={},
                      train=frozenset("ab"), steps=1, fault=ClientFault(drop=c == 1)) for c in range(3)]
    live, failed = apply_faults(jobs)
    assert [j.client_id for j in live] == [0, 2]
    assert list(failed) == [1] and failed[1].simulated and not failed[1].retryable


def test_frozen_changed_names_every_frozen_factor_that_moved():
    rng = np.random.default_rng(0)
    start = {m: LoRAFactors(a=rng.standard_normal((2, 5)).astype(np.float32), b=np.zeros((4, 2), np.float32),
                            scale=2.0) for m in ("q", "v")}
    end = {m: LoRAFactors(a=f.a.copy(), b=f.b + 1, scale=f.scale) for m, f in start.items()}
    assert frozen_changed(start, end, frozenset({"b"})) == []            # FFA: B trained, A bitwise equal
    end["v"].a[1, 3] = np.nextafter(end["v"].a[1, 3], np.float32(9))    # one ulp in one entry
    assert frozen_changed(start, end, frozenset({"b"})) == ["v.a"]
    assert frozen_changed(start, end, frozenset({"a"})) == ["q.b", "v.b"]   # RoLoRA A-phase: B must not move
    assert frozen_changed(start, end, frozenset({"a", "b"})) == []
