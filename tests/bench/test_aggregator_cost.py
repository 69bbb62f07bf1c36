"""`raysim bench --workload aggregators`: every method is timed on factors of the right shapes."""

from raysim.aggregators import REGISTRY
from raysim.bench.aggregator_cost import format_aggregator_table, time_aggregators


def test_every_aggregator_is_timed_and_tabulated():
    rows = time_aggregators(num_clients=3, rank=2, layers=1)
    assert [r["aggregator"] for r in rows] == sorted(REGISTRY)
    for r in rows:
        assert r["modules"] == 2 and r["clients"] == 3
        assert r["aggregate_s"] > 0 and r["server_s"] >= r["aggregate_s"]
        # the deviation metric is timed exactly for the methods whose deviation the coordinator computes
        measured = not REGISTRY[r["aggregator"]].personalized and r["aggregator"] != "flexlora"
        assert (r["deviation_s"] > 0) == measured
    table = format_aggregator_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| fedex |" in table
