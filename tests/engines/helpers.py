"""Shared pieces of the cohort-engine equivalence tests: client jobs of different sizes, ranks and step
counts, and the check that each client's update equals its solo (PEFT engine) update."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.engines.base import ClientJob
from raysim.lora.factors import LoRAFactors
from raysim.lora.peft_io import get_factors, get_head


def start_factors(model, rank: int, seed: int, scale: float) -> dict[str, LoRAFactors]:
    """Non-trivial start factors (B != 0, so A receives gradients from step one)."""
    rng = np.random.default_rng(seed)
    return {name: LoRAFactors(a=(0.1 * rng.normal(size=(rank, f.a.shape[1]))).astype(np.float32),
                              b=(0.1 * rng.normal(size=(f.b.shape[0], rank))).astype(np.float32), scale=scale)
            for name, f in get_factors(model).items()}


def make_jobs(model, clients, scale: float, test_len: int, offset: int = 0, **extra) -> list[ClientJob]:
    """One job per client spec ({size, rank, steps}): consecutive training rows from `offset`, a local test
    split of `test_len` rows, non-trivial start factors of the client's rank and a client-specific head."""
    head = get_head(model)
    jobs, start = [], offset
    for i, c in enumerate(clients):
        idx = np.arange(start, start + c["size"])
        start += c["size"]
        jobs.append(ClientJob(client_id=i, round=1, seed=100 + i, train_idx=idx,
                              test_idx=np.arange(300 + 10 * i, 300 + 10 * i + test_len),
                              start=start_factors(model, c["rank"], i, scale),
                              head={k: v + 0.01 * i for k, v in head.items()}, train=frozenset("ab"),
                              steps=c["steps"], **extra))
    return jobs


def assert_updates_same(solo, cohort, jobs, rtol: float = 1e-5) -> None:
    """Same ids, steps and sizes, the same factor updates (relative to the largest solo change) and the same
    training loss, client by client."""
    for s, c, job in zip(solo, cohort, jobs):
        assert (s.client_id, s.steps, s.num_samples) == (c.client_id, c.steps, c.num_samples)
        for name, f0 in job.start.items():
            assert c.factors[name].rank == f0.rank
            for key in "ab":
                d_solo = getattr(s.factors[name], key) - getattr(f0, key)
                d_coh = getattr(c.factors[name], key) - getattr(f0, key)
                assert np.abs(d_solo).max() > 0 or key not in job.train
                np.testing.assert_allclose(d_coh, d_solo, rtol=0, atol=rtol * np.abs(d_solo).max() + 1e-9,
                                           err_msg=f"client {job.client_id} {name}.{key}")
        assert c.train_loss == pytest.approx(s.train_loss, rel=1e-6)


def engine_pair(model, arrays, settings, task):
    """(PEFT engine, cohort engine) over the same resident model and data, on the CPU."""
    import torch

    from raysim.engines.cohort import CohortEngine
    from raysim.engines.peft_engine import DataArrays, PeftEngine

    data = DataArrays(arrays, torch.device("cpu"))
    peft = PeftEngine(model, data, settings, task)
    return peft, CohortEngine(model, data, settings, peft=peft)
