"""The soak benchmark's bookkeeping on a short run (the real soak, 200 rounds, is a benchmark, not a test)."""

from __future__ import annotations

import pytest

from raysim.bench.soak import _growth, run_soak

pytestmark = pytest.mark.ray


def test_growth_compares_the_last_fifth_with_the_second():
    assert _growth([100.0] * 10 + [120.0] * 10) == pytest.approx(1.2)
    assert _growth([5.0, None, 5.0]) is None


def test_a_short_soak_under_faults_loses_nothing(ray_local):
    out = run_soak(rounds=8, clients=60, log=lambda msg: None)
    assert out["status"] == "completed" and out["rounds"] == 8
    assert not any(out["lost"].values()) and out["targets"]["nothing_lost"]
    assert out["workers_killed"] == 1 and len(out["memory"]) == 8
    assert set(out["client_status"]) <= {"ok", "failed", "rejected", "straggler"}
