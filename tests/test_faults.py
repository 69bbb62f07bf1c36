"""Fault injection (raysim.faults): who fails how, deadlines, and corrupt uploads. No Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest

from raysim.config import load_config
from raysim.engines.base import ClientFailure, ClientFault, ClientJob, ClientResult
from raysim.faults import FaultInjector, apply_faults, corrupt_results
from raysim.lora.factors import LoRAFactors
from raysim.validation import rejection_reason


def _faults(**kw):
    return load_config(None, [f"faults.{k}={v}" for k, v in kw.items()]).faults


def test_corrupt_rate_picks_exactly_the_clients_drop_rate_would():
    corrupt = FaultInjector(_faults(corrupt_rate=0.3, corrupt_kind="inf"), seed=7)
    drop = FaultInjector(_faults(drop_rate=0.3), seed=7)
    picks = [(corrupt.for_client(r, c), drop.for_client(r, c)) for r in range(1, 6) for c in range(40)]
    assert all((a.corrupt == "inf") == b.drop for a, b in picks)
    assert all(not a.drop and b.corrupt is None for a, b in picks)
    assert 0.15 < np.mean([b.drop for _, b in picks]) < 0.45


def test_drop_plus_corrupt_must_stay_below_one():
    from raysim.errors import ConfigError

    with pytest.raises(ConfigError, match="faults.corrupt_rate"):
        _faults(drop_rate=0.6, corrupt_rate=0.4)


def _job(cid, fault=ClientFault(), deadline=None):
    rng = np.random.default_rng(cid)
    start = {"q": LoRAFactors(a=rng.normal(size=(2, 6)).astype(np.float32), b=np.zeros((5, 2), np.float32),
                              scale=1.0)}
    return ClientJob(client_id=cid, round=1, seed=cid, train_idx=np.arange(4), test_idx=None, start=start,
                     head={}, train=frozenset({"a", "b"}), steps=1, fault=fault, deadline=deadline)


def _result(job):
    f = job.start["q"]
    return ClientResult(job.client_id, {"q": LoRAFactors(a=f.a + 0.01, b=f.b + 0.02, scale=1.0)}, {}, 4, 0.5,
                        0.1, 1)


@pytest.mark.parametrize("kind, expect", [("nan", "not finite"), ("inf", "not finite"), ("shape", "shape"),
                                          ("huge", "max_update_norm")])
def test_each_corrupt_kind_is_caught_by_the_server_checks(kind, expect):
    jobs = [_job(0), _job(1, ClientFault(corrupt=kind))]
    clean, broken = corrupt_results(jobs, [_result(j) for j in jobs])
    assert rejection_reason(jobs[0].start, clean.factors, jobs[0].train, None, None, 1.0) is None
    reason = rejection_reason(jobs[1].start, broken.factors, jobs[1].train, None, None, 1.0)
    assert reason is not None and expect in reason


def test_a_slow_task_stops_waiting_at_the_deadline_and_reports_stragglers():
    jobs = [_job(0, ClientFault(delay_s=30.0), deadline=time.time() + 0.3), _job(1, deadline=time.time() + 0.3)]
    t0 = time.perf_counter()
    live, failed = apply_faults(jobs)
    assert time.perf_counter() - t0 < 5.0                      # did not sleep the 30 s
    assert live == [] and {f.status for f in failed.values()} == {"straggler"} and set(failed) == {0, 1}


def test_jobs_before_the_deadline_run_and_drop_outs_are_simulated_failures():
    jobs = [_job(0, ClientFault(drop=True)), _job(1, deadline=time.time() + 60)]
    live, failed = apply_faults(jobs)
    assert [j.client_id for j in live] == [1]
    assert isinstance(failed[0], ClientFailure) and failed[0].simulated and failed[0].status == "failed"
