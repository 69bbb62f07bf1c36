"""Fractional GPUs on a CPU-only machine: Ray started with a fake GPU count (RAY_NOTES.md §2).

Four workers at `gpus_per_worker: 0.25` and `cpus_per_worker: 0` must all be scheduled on one
logical GPU of a 2-CPU Ray, a fifth must wait, and a simulation with that layout (cohort engine)
runs to the end using all four workers.
"""

from __future__ import annotations

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
    ray = ray_two_cpus_one_gpu
    from raysim.worker import ClientWorker

    cfg = tiny_config(**{"resources.num_workers": 4, "resources.gpus_per_worker": 0.25,
                         "resources.cpus_per_worker": 0, "resources.engine": "cohort",
                         "federation.rounds": 1, "eval.every": 1})
    assert resolve_gpus(cfg) == 0.25
    workers = [ClientWorker.options(num_cpus=0, num_gpus=0.25).remote(cfg.to_yaml_dict(), 4, i, 0.25)
               for i in range(5)]
    try:
        ready, pending = ray.wait([w.ping.remote() for w in workers], num_returns=4, timeout=120)
        assert len(ready) == 4
        ready, pending = ray.wait(pending, timeout=2)
        assert not ready                                        # the fifth quarter does not exist
    finally:
        for w in workers:
            ray.kill(w)

    run_experiment(cfg, tmp_path / "run", progress=False)
    clients = pd.read_parquet(tmp_path / "run" / "clients.parquet")
    assert set(clients["status"]) == {"ok"}
    assert sorted(clients["worker"].unique()) == [0, 1, 2, 3]   # 4 clients, 4 cohorts of one, all workers busy


def test_more_gpu_than_the_cluster_has_is_a_config_error(ray_two_cpus_one_gpu, tiny_config):
    cfg = tiny_config(**{"resources.num_workers": 5, "resources.gpus_per_worker": 0.25})
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        resolve_gpus(cfg)
