"""End to end with `resources.engine: cohort`: the same run as with the PEFT engine, metric for metric.

Dropped clients (fault injection) fail alone inside their cohort; personalised evaluation runs on
the stacked adapters.
"""

from __future__ import annotations

import pandas as pd
import pytest

from raysim.runner import run_experiment

pytestmark = pytest.mark.ray

OVERRIDES = {"federation.rounds": 1, "faults.drop_rate": 0.3, "eval.personalized": "true", "resources.cohort_size": 3}


def test_cohort_engine_run_equals_the_peft_engine_run(ray_local, tmp_path, tiny_config):
    frames = {}
    for engine in ("peft", "cohort"):
        cfg = tiny_config(**OVERRIDES, **{"resources.engine": engine})
        run_experiment(cfg, tmp_path / engine, progress=False)
        frames[engine] = (pd.read_parquet(tmp_path / engine / "rounds.parquet"),
                          pd.read_parquet(tmp_path / engine / "clients.parquet"))
    (r_peft, c_peft), (r_coh, c_coh) = frames["peft"], frames["cohort"]
    assert list(c_coh["client_id"]) == list(c_peft["client_id"])
    assert list(c_coh["status"]) == list(c_peft["status"])
    assert list(c_coh["status"]) == ["failed", "ok", "failed", "ok"]     # clients 0, 1, 2, 4 (seeded faults)
    ok = c_peft["status"] == "ok"
    pd.testing.assert_series_equal(c_coh["train_loss"][ok], c_peft["train_loss"][ok], rtol=1e-5)
    pd.testing.assert_series_equal(c_coh["local_accuracy"][ok], c_peft["local_accuracy"][ok])
    for col in ("accuracy", "clients_completed", "clients_failed", "personalized_accuracy"):
        pd.testing.assert_series_equal(r_coh[col], r_peft[col], rtol=1e-5)
    pd.testing.assert_series_equal(r_coh["loss"], r_peft["loss"], rtol=1e-4)


@pytest.mark.parametrize("name", ["ffa", "rolora"])
def test_cohort_engine_returns_frozen_factors_bit_for_bit(ray_local, tmp_path, tiny_config, name):
    """FFA's A and RoLoRA's idle factor (B in round 2) go through the stacked tensors and back unchanged;
    `output.debug` stops the run otherwise. Exact methods then have zero deviation."""
    cfg = tiny_config(**{"aggregator.name": name, "federation.rounds": 2, "resources.engine": "cohort",
                         "resources.cohort_size": 4, "output.debug": "true"})
    run_experiment(cfg, tmp_path, progress=False)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert list(rounds["round"]) == [1, 2] and (rounds["deviation_rel"] < 1e-6).all()


def test_cohort_size_auto_calibrates_on_the_first_cohort_and_trains_like_the_peft_engine(ray_local, tmp_path,
                                                                                       tiny_config):
    """The timing calls' results are thrown away: the run equals the PEFT engine's, whatever size was chosen."""
    frames, summaries = {}, {}
    for engine, size in (("peft", 8), ("cohort", "auto")):
        cfg = tiny_config(**{"federation.rounds": 2, "resources.engine": engine, "resources.cohort_size": size})
        summaries[engine] = run_experiment(cfg, tmp_path / engine, progress=False)
        frames[engine] = (pd.read_parquet(tmp_path / engine / "rounds.parquet"),
                          pd.read_parquet(tmp_path / engine / "clients.parquet"))
    (r_peft, c_peft), (r_coh, c_coh) = frames["peft"], frames["cohort"]
    assert list(c_coh["client_id"]) == list(c_peft["client_id"])
    pd.testing.assert_series_equal(c_coh["train_loss"], c_peft["train_loss"], rtol=1e-5)
    pd.testing.assert_series_equal(r_coh["accuracy"], r_peft["accuracy"], rtol=1e-5)
    calibration = summaries["cohort"]["cohort_calibration"]
    assert calibration and set(calibration) <= {"0", "1"}                     # per worker that trained
    for found in calibration.values():
        rates = {int(k): v for k, v in found["client_steps_per_s"].items()}
        assert 1 in rates and all(v > 0 for v in rates.values())
        assert found["cohort_size"] == max(rates, key=rates.get)
    assert "cohort_calibration" not in summaries["peft"]
