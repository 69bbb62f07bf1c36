"""Every registered aggregator runs from the CLI on the tiny config; deviation and bytes are checked
against docs/algorithms.md ("Deviation metric", "Communication accounting") from the files a user gets. Every run has `output.debug: true`, so the
factors each method keeps frozen are checked to come back from the engine bit for bit."""

from __future__ import annotations

import pandas as pd
import pytest

from raysim.aggregators import REGISTRY
from raysim.cli import main

pytestmark = pytest.mark.ray

R, M, N, MODULES, K = 4, 128, 128, 4, 4      # tiny: bert-tiny (128×128 query/value in 2 layers), r=4, 4 per round
HEAD = 4 * 128 + 4                            # classifier weight + bias, averaged like FedAvg
BYTES = 4                                     # float32 on the wire


def _run(tmp_path_factory, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = tmp_path_factory.mktemp(name)
    rc = main(["run", "experiments/tiny.yaml", "--out", str(out), "--no-progress", "--set", f"aggregator.name={name}",
               "--set", "federation.rounds=2", "--set", "train.local_steps=2",
               "--set", "resources.num_workers=1", "--set", "output.debug=true"])   # frozen factors checked
    assert rc == 0
    return pd.read_parquet(out / "rounds.parquet"), pd.read_parquet(out / "clients.parquet")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import ray

    from conftest import RAY_LOCAL

    if not ray.is_initialized():
        ray.init(**RAY_LOCAL)
    return {name: _run(tmp_path_factory, name) for name in sorted(REGISTRY)}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_aggregator_completes_from_the_cli(results, name):
    rounds, clients = results[name]
    assert list(rounds["round"]) == [1, 2]
    assert (rounds["clients_completed"] == K).all() and set(clients["status"]) == {"ok"}
    assert rounds["accuracy"].between(0, 1).all()
    if REGISTRY[name].personalized:
        assert rounds["deviation_rel"].isna().all()
    else:
        assert rounds["deviation_rel"].notna().all()


@pytest.mark.parametrize("name", [n for n in ("fedex", "ffa", "flora", "rolora") if n in REGISTRY])
def test_exact_methods_have_zero_deviation(results, name):
    assert (results[name][0]["deviation_rel"] < 1e-5).all()


@pytest.mark.parametrize("name", ["fedit", "lora_fair"])
def test_inexact_methods_deviate_on_non_iid_clients(results, name):
    assert (results[name][0]["deviation_rel"] > 1e-4).all()


def _up_down(results, name):
    rounds, _ = results[name]
    return list(rounds["bytes_up"] // BYTES), list(rounds["bytes_down"] // BYTES)




@pytest.mark.parametrize("name", ["fedit", "lora_fair", "flexlora"])
def test_bytes_two_factors_each_way(results, name):
    up, down = _up_down(results, name)
    per_client = R * (M + N) * MODULES + HEAD
    assert up == [K * per_client] * 2 and down == [K * per_client] * 2


def test_bytes_fedex_adds_the_missed_residual(results):
    up, down = _up_down(results, "fedex")
    per_client = R * (M + N) * MODULES + HEAD
    residual = min(M * N, (K - 1) * R * (M + N)) * MODULES       # round 1's residual, factored
    assert up == [K * per_client] * 2
    assert down == [K * per_client, K * (per_client + residual)]


def _first_time_in_round_2(results, name) -> int:
    """Clients sampled in round 2 that were not sampled in round 1 (they still need one-off items)."""
    clients = results[name][1]
    return len(set(clients[clients["round"] == 2]["client_id"]) - set(clients[clients["round"] == 1]["client_id"]))


def test_bytes_ffa_only_b(results):
    up, down = _up_down(results, "ffa")
    assert up == [K * (R * M * MODULES + HEAD)] * 2
    new = _first_time_in_round_2(results, "ffa")     # the shared seed of the frozen A: once per client
    assert down == [K * (R * M * MODULES + HEAD + 1), K * (R * M * MODULES + HEAD) + new]


def test_bytes_fedsa_only_a(results):
    up, down = _up_down(results, "fedsa")
    assert up == down == [K * (R * N * MODULES + HEAD)] * 2


def test_bytes_rolora_alternate(results):
    up, down = _up_down(results, "rolora")
    clients = results["rolora"][1]
    assert up == [K * (R * M * MODULES + HEAD), K * (R * N * MODULES + HEAD)]      # B-phase, then A-phase
    first = set(clients[clients["round"] == 1]["client_id"])
    second = set(clients[clients["round"] == 2]["client_id"])
    returning = len(first & second)                  # they only need the B that changed in round 1
    expected = returning * (R * M * MODULES + HEAD) + (K - returning) * (R * (M + N) * MODULES + HEAD)
    assert down == [K * (R * (M + N) * MODULES + HEAD), expected]


def test_bytes_flora_download_grows_with_the_stack(results):
    up, down = _up_down(results, "flora")
    merged = min(M * N, K * R * (M + N)) * MODULES   # the round-1 stack every client must fold
    assert up == [K * (R * (M + N) * MODULES + HEAD)] * 2
    new = _first_time_in_round_2(results, "flora")
    assert down == [K * (HEAD + 1), K * (HEAD + merged) + new]   # fresh adapters come from a seed, sent once
