"""The cohort engine inside a worker (no Ray): out-of-memory splitting, per-job failures, CE-LoRA
fallback; and how the pool groups a round's jobs into cohorts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raysim.engines.base import ClientFailure, ClientFault, ClientJob, ClientResult
from raysim.engines.calibrate import CANDIDATES, GPU_CANDIDATES
from raysim.pool import plan_tasks, task_cap
from raysim.worker import ClientWorkerImpl


@pytest.fixture(scope="module")
def worker(tiny_config, tmp_path_factory):
    import os

    from raysim.models import tokenize_for_model
    from raysim.runner import prepare_data

    os.environ.setdefault("RAYSIM_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = tiny_config(**{"resources.engine": "cohort"})
    raw, partition = prepare_data(cfg)
    threads = torch.get_num_threads()
    w = ClientWorkerImpl(cfg, int(raw.num_labels), 0, 0.0)
    torch.set_num_threads(1)
    w.set_data(tokenize_for_model(raw, cfg))
    w.partition = partition
    yield w
    torch.set_num_threads(threads)


def _jobs(worker, n=4):
    factors, head = worker.initial_state()
    return [ClientJob(client_id=c, round=1, seed=10 + c, train_idx=worker.partition["client_train"][c],
                      test_idx=None, start=factors, head=head, train=frozenset("ab"), steps=2) for c in range(n)]


def _same(a: ClientResult, b: ClientResult):
    assert a.client_id == b.client_id and a.train_loss == pytest.approx(b.train_loss, rel=1e-6)
    for name in a.factors:
        np.testing.assert_allclose(a.factors[name].b, b.factors[name].b, rtol=0, atol=1e-6)


def test_worker_uses_the_cohort_engine(worker):
    assert worker.cohort is not None
    calls = []
    real = worker.cohort.train_cohort
    worker.cohort.train_cohort = lambda jobs: calls.append(len(jobs)) or real(jobs)
    try:
        results = worker.train(_jobs(worker))
    finally:
        worker.cohort.train_cohort = real
    assert calls == [4] and all(isinstance(r, ClientResult) and r.worker == 0 for r in results)


def test_out_of_memory_splits_the_cohort_and_never_fails_it(worker):
    jobs = _jobs(worker)
    expected = worker.train(jobs)
    real = worker.cohort.train_cohort

    def small_gpu(batch):                      # pretend only one client fits at a time
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    worker.cohort.train_cohort = small_gpu
    worker.oom_splits = 0
    try:
        results = worker.train(jobs)
    finally:
        worker.cohort.train_cohort = real
    assert worker.oom_splits == 3                                   # 4 -> 2 + 2 -> 1 + 1 + 1 + 1
    for got, want in zip(results, expected):
        _same(got, want)


def test_a_client_that_does_not_fit_alone_is_a_retryable_failure(worker):
    jobs = _jobs(worker, 2)
    real = worker.cohort.train_cohort

    def no_room_for_client_1(batch):
        if any(j.client_id == 1 for j in batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(batch)

    worker.cohort.train_cohort = no_room_for_client_1
    try:
        ok, failed = worker.train(jobs)
    finally:
        worker.cohort.train_cohort = real
    assert isinstance(ok, ClientResult) and ok.client_id == 0
    assert isinstance(failed, ClientFailure) and failed.retryable and not failed.simulated
    assert "out of GPU memory" in failed.error


def test_dropped_clients_fail_alone_and_tri_matrix_jobs_use_peft(worker):
    jobs = _jobs(worker, 3)
    jobs[1] = dataclasses.replace(jobs[1], fault=ClientFault(drop=True))
    core = {k: dataclasses.replace(f, c=np.eye(f.rank, dtype=np.float32)) for k, f in jobs[2].start.items()}
    jobs[2] = dataclasses.replace(jobs[2], start=core, train=frozenset("abc"))
    seen = []
    real = worker.cohort.train_cohort
    worker.cohort.train_cohort = lambda batch: seen.extend(j.client_id for j in batch) or real(batch)
    try:
        results = worker.train(jobs)
    finally:
        worker.cohort.train_cohort = real
    assert isinstance(results[0], ClientResult)
    assert isinstance(results[1], ClientFailure) and results[1].simulated
    assert isinstance(results[2], ClientResult) and seen == [0]          # CE-LoRA went through PEFT
    assert all(f.c is not None for f in results[2].factors.values())


def _tasks(engine: str, cohort_size: int, workers: int, jobs):
    return plan_tasks(jobs, engine, cohort_size, batch_size=16, live_workers=workers)


def _sized_jobs(sizes):
    return [ClientJob(client_id=i, round=1, seed=i, train_idx=np.arange(n), test_idx=None, start={}, head={},
                      train=frozenset("ab"), steps=max(1, n // 16)) for i, n in enumerate(sizes)]


def test_with_cohort_size_auto_tasks_hold_up_to_the_largest_calibration_candidate():
    assert task_cap("auto") == max(CANDIDATES) and task_cap(5) == 5
    assert task_cap("auto", gpu=True) == max(GPU_CANDIDATES) == 64 and task_cap(5, gpu=True) == 5
    tasks = _tasks("cohort", task_cap("auto"), 2, _sized_jobs([64] * 40))
    assert len(tasks) == 4 and sorted(len(t) for t in tasks) == [10, 10, 10, 10]


def test_pool_groups_similar_clients_into_cohorts_for_every_worker():
    rng = np.random.default_rng(0)
    jobs = _sized_jobs(rng.integers(8, 400, size=10))
    tasks = _tasks("cohort", 8, 2, jobs)
    assert [len(t) for t in tasks] == [5, 5]                    # 10 clients, 2 workers: nobody idles
    costs = [[j.steps * min(len(j.train_idx), 16) for j in t] for t in tasks]
    assert min(costs[0]) >= max(costs[1])                       # similar sizes share a cohort
    many = _tasks("cohort", 8, 2, _sized_jobs(rng.integers(8, 400, size=100)))
    assert len(many) % 2 == 0 and max(len(t) for t in many) <= 8
    assert sorted(j.client_id for t in many for j in t) == list(range(100))
    assert [len(t) for t in _tasks("peft", 8, 2, jobs)] == [1] * 10
