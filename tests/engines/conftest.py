"""Fixtures of the engine tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 matmuls: OpenMP threads only add synchronisation (and suffer on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
