"""Shared fixtures. One local Ray instance per test session (ray.init costs seconds here).

`ray_local` starts it lazily with 8 logical CPUs and 1 logical GPU (a fake GPU: fractional-GPU
scheduling is exercised on CPU-only machines) in a private temp dir. A test that needs a different
Ray configuration calls `ray.shutdown()` first; the next `ray_local` user restarts the shared one.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RAY_LOCAL = dict(address="local", num_cpus=8, num_gpus=1, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")


@pytest.fixture(scope="session")
def ray_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ray"))


@pytest.fixture
def ray_local(ray_tmp, tmp_path_factory):
    import ray

    # token cache of this test session (Ray workers inherit the environment at ray.init)
    os.environ["RAYSIM_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    if not ray.is_initialized():
        ray.init(**RAY_LOCAL, _temp_dir=ray_tmp)
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_end():
    yield
    import ray

    ray.shutdown()


def tiny_config(**overrides):
    """The tiny experiment (random bert-tiny on synthetic data) with dotted overrides."""
    from raysim.config import load_config

    return load_config(ROOT / "experiments" / "tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(name="tiny_config", scope="session")
def tiny_config_fixture():
    """`tiny_config(**{"a.b": value})` as a fixture, for test modules in any folder."""
    return tiny_config
