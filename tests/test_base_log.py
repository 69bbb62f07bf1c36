"""The base-delta log (raysim/base_log.py): each entry in its smaller form, prefix compaction, catch-up
accounting and checkpoints, against dense float64 sums written here."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.base_log import BaseDeltaLog
from raysim.lora.factors import BaseDelta

M, N = 6, 5                      # m·n = 30; a rank-q entry costs 11·q factored


def _delta(rng, q):
    return BaseDelta(rng.standard_normal((M, q)), rng.standard_normal((q, N)))


@pytest.fixture
def entries():
    rng = np.random.default_rng(0)
    return {1: _delta(rng, 1), 2: _delta(rng, 4), 3: _delta(rng, 2), 4: _delta(rng, 1)}


def _log(entries):
    log = BaseDeltaLog()
    for version, d in entries.items():
        log.record(version, {"q": d})
    return log


def _dense_sum(entries, versions):
    return sum(entries[v].u @ entries[v].v for v in versions)


def test_entries_larger_than_dense_are_stored_dense(entries):
    log = _log(entries)
    kinds = {version: per_module["q"][1] is None for version, per_module in log.entries}
    assert kinds == {1: False, 2: True, 3: False, 4: False}            # 44 > 30 scalars: dense; 22, 11: factored
    np.testing.assert_allclose(log.since(1)[0][1]["q"][0], entries[2].u @ entries[2].v, rtol=1e-12)
    np.testing.assert_allclose(log.cumulative()["q"], _dense_sum(entries, [1, 2, 3, 4]), rtol=1e-12)


def test_catch_up_is_charged_from_the_factored_sizes(entries):
    log = _log(entries)
    shapes = {"q": (M, N)}
    assert log.catch_up_numel(0, shapes) == min(30, 11 + 30 + 22 + 11)
    assert log.catch_up_numel(2, shapes) == min(30, 22 + 11) and log.catch_up_numel(3, shapes) == 11
    assert log.catch_up_numel(4, shapes) == 0
    log.compact(3)                                                      # merged storage, the same accounting
    assert [log.catch_up_numel(v, shapes) for v in range(5)] == [30, 30, 30, 11, 0]


def test_compaction_merges_the_oldest_entries_without_changing_the_base(entries):
    log = _log(entries)
    before = log.cumulative()["q"]
    log.compact(3)
    assert [v for v, _ in log.entries] == [3, 4]
    u, v = log.entries[0][1]["q"]
    assert v is None                                                    # 1 + 4 + 2 slots > dense: summed densely
    np.testing.assert_allclose(u, _dense_sum(entries, [1, 2, 3]), rtol=1e-12)
    np.testing.assert_allclose(log.cumulative()["q"], before, rtol=1e-12)
    assert [v for v, _ in log.since(0)] == [3, 4] and [v for v, _ in log.since(3)] == [4]
    small = _log({1: entries[1], 4: entries[4]})
    small.compact(4)
    u, v = small.entries[0][1]["q"]
    assert small.version == 4 and u.shape == (M, 2) and v.shape == (2, N)    # 22 < 30: kept factored
    np.testing.assert_allclose(u @ v, _dense_sum(entries, [1, 4]), rtol=1e-12)


def test_checkpoints_keep_dense_entries_and_sizes(entries):
    log = _log(entries)
    log.compact(2)
    again = BaseDeltaLog()
    again.load_state_dict(*log.state_dict())
    np.testing.assert_array_equal(again.cumulative()["q"], log.cumulative()["q"])
    assert [(v, d["q"][1] is None) for v, d in again.entries] == [(v, d["q"][1] is None) for v, d in log.entries]
    assert again.catch_up_numel(1, {"q": (M, N)}) == log.catch_up_numel(1, {"q": (M, N)}) == 30


def test_the_older_checkpoint_format_still_loads(entries):
    tensors = {f"{v}/q/{part}": getattr(d, part) for v, d in entries.items() for part in "uv"}
    log = BaseDeltaLog()
    log.load_state_dict(tensors, {str(v): ["q"] for v in entries})
    np.testing.assert_allclose(log.cumulative()["q"], _dense_sum(entries, [1, 2, 3, 4]), rtol=1e-12)
    assert log.catch_up_numel(0, {"q": (M, N)}) == 30 and log.catch_up_numel(3, {"q": (M, N)}) == 11


def test_catch_up_from_running_totals_equals_a_scan_over_every_version():
    """Modules that change only in some versions, dense and factored entries, through compaction and a
    checkpoint: the running totals charge exactly what summing every missed version gives."""
    rng = np.random.default_rng(3)
    shapes = {"q": (M, N), "k": (3, 4), "v": (9, 2)}
    log, sizes = BaseDeltaLog(), {}
    for version in (2, 3, 5, 8, 9, 12):
        delta = {name: BaseDelta(rng.standard_normal((m, q)), rng.standard_normal((q, n)))
                 for (name, (m, n)), q in zip(shapes.items(), rng.integers(1, 5, size=3)) if rng.random() < 0.7}
        log.record(version, delta)
        sizes[version] = {name: d.numel() for name, d in delta.items()}

    def scan(held):
        missed = {}
        for v, per_module in sizes.items():
            for name, n in per_module.items():
                missed[name] = missed.get(name, 0) + n * (v > held)
        return sum(min(shapes[k][0] * shapes[k][1], n) for k, n in missed.items())

    log.compact(5)
    again = BaseDeltaLog()
    again.load_state_dict(*log.state_dict())
    assert [again.catch_up_numel(v, shapes) for v in range(14)] == [scan(v) for v in range(14)]
    assert scan(0) > scan(9) > 0
    with pytest.raises(ValueError, match="not newer"):
        again.record(12, {"q": _delta(rng, 1)})


def test_newest_is_the_stored_form_of_the_last_version_only(entries):
    log = _log(entries)
    newest = log.newest(4)
    assert set(newest) == {"q"} and newest["q"].v is not None                      # rank 1: kept factored
    np.testing.assert_allclose(newest["q"].u @ newest["q"].v, entries[4].u @ entries[4].v, rtol=1e-12)
    assert log.newest(3) is None                                                    # not the newest entry
    log.record(5, {"q": _delta(np.random.default_rng(1), 4), "k": BaseDelta(np.zeros((M, 0)), np.zeros((0, N)))})
    five = log.newest(5)
    assert set(five) == {"q"} and five["q"].v is None                               # dense; the empty one is left out
