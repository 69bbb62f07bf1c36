"""`raysim bench --workload aggregators`: every method is timed on factors of the right shapes, against a
calibration measured in the same run, and the targets are read from the medians."""

import json

import pytest

from raysim.aggregators import REGISTRY
from raysim.bench.aggregator_cost import format_aggregator_table, ratios, targets, time_aggregators


@pytest.fixture(scope="module")
def out():
    return time_aggregators(clients=(3, 6), rank=2, layers=1, trials=2)


def test_every_aggregator_is_timed_at_every_client_count(out):
    rows = out["rows"]
    assert [(r["aggregator"], r["clients"]) for r in rows] == [(n, k) for k in (3, 6) for n in sorted(REGISTRY)]
    assert set(out["calibration_s"]) == {3, 6} and all(v > 0 for v in out["calibration_s"].values())
    every = [c for r in rows if r["clients"] == 3 for c in r["calibration_trials_s"]]
    assert min(every) <= out["calibration_s"][3] <= max(every)            # the median over every trial
    assert out["trials"] == 2 and isinstance(out["load_ok"], bool)
    for r in rows:
        assert r["modules"] == 2 and len(r["load_average_1m"]) == 2
        assert len(r["aggregate_trials_s"]) == len(r["calibration_trials_s"]) == 2
        assert min(r["aggregate_trials_s"]) <= r["aggregate_s"] <= max(r["aggregate_trials_s"])
        assert r["aggregate_s"] > 0 and r["server_s"] == pytest.approx(r["aggregate_s"] + r["deviation_s"])
        # the deviation metric is timed exactly for the methods whose deviation the coordinator computes
        measured = not REGISTRY[r["aggregator"]].personalized and r["aggregator"] != "flexlora"
        assert (r["deviation_s"] > 0) == measured
    json.dumps(out)                                                     # the CLI writes it as is


def test_ratios_and_targets_follow_the_medians(out):
    rat = ratios(out)
    fedit3 = next(r for r in out["rows"] if r["aggregator"] == "fedit" and r["clients"] == 3)
    fedit6 = next(r for r in out["rows"] if r["aggregator"] == "fedit" and r["clients"] == 6)
    # each ratio divides by the calibration measured between the row's own trials
    assert rat["fedit"]["deviation_x_cal_3"] == pytest.approx(fedit3["deviation_s"] / fedit3["calibration_s"])
    assert rat["fedit"]["growth_6_over_3"] == pytest.approx(fedit6["server_s"] / fedit3["server_s"])
    tgt = targets(out)
    assert tgt["fedit_deviation_le_1.3x"] == (rat["fedit"]["deviation_x_cal_3"] <= 1.3)
    assert tgt["flexlora_aggregate_le_2.0x"] == (rat["flexlora"]["aggregate_x_cal_3"] <= 2.0)
    assert "fedsa_deviation_le_1.3x" not in tgt                         # personalised: no deviation metric
    assert set(tgt) >= {f"{n}_growth_le_2.2x" for n in REGISTRY}


def test_table_has_one_line_per_row_and_the_calibration(out):
    table = format_aggregator_table(out)
    assert table.count("\n| ") == len(out["rows"]) + 1 and "| fedex | 3 |" in table
    assert "calibration_s" in table
