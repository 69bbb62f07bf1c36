"""Fractional GPUs on a CPU-only machine: Ray started with a fake GPU count (Ray counts GPUs as logical resources).

Four workers at `gpus_per_worker: 0.25` and `cpus_per_worker: 0` must all be scheduled on one
logical GPU of a 2-CPU Ray (with the default of one CPU per actor only two would start), a fifth
quarter is refused before any actor starts, and a simulation with that layout (cohort engine) runs
to the end using all four workers.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raysim.config import ConfigError
from raysim.runner import resolve_gpus, run_experiment

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_two_cpus_one_gpu(ray_tmp, tmp_path_factory, monkeypatch):
    import ray

    ray.shutdown()                        # the shared session Ray has another shape; the next user restarts it
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", _temp_dir=ray_tmp)
    yield ray
    ray.shutdown()


def test_four_quarter_gpu_workers_share_one_fake_gpu(ray_two_cpus_one_gpu, tmp_path, tiny_config):
    """2 logical CPUs, 1 logical GPU: 4 workers fit only with num_cpus=0 and num_gpus=0.25 each."""
    cfg = tiny_config(**{"resources.num_workers": 4, "resources.gpus_per_worker": 0.25,
                         "resources.cpus_per_worker": 0, "resources.engine": "cohort", "federation.rounds": 1})
    assert resolve_gpus(cfg) == 0.25
    with pytest.raises(ConfigError, match="gpus_per_worker"):       # a fifth quarter does not exist
        resolve_gpus(tiny_config(**{"resources.num_workers": 5, "resources.gpus_per_worker": 0.25}))

    run_experiment(cfg, tmp_path / "run", progress=False)
    clients = pd.read_parquet(tmp_path / "run" / "clients.parquet")
    assert set(clients["status"]) == {"ok"}
    assert sorted(clients["worker"].unique()) == [0, 1, 2, 3]   # 4 clients, 4 cohorts of one, every worker ran
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["gpus_per_worker"] == 0.25
