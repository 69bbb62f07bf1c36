"""WorkerPool: dispatches client jobs to the ClientWorker actors.

Dispatch keeps every worker busy and the slowest one short: jobs are sorted by cost (largest
first) and each goes to the worker with the least outstanding work, with up to two tasks in flight
per worker so the next one is queued before the current one finishes. With the cohort engine a task
is a cohort: clients of similar cost grouped up to `resources.cohort_size`. Every wait has a deadline.
A job whose worker died or raised is retried on another worker; a dead worker is replaced.
Before a worker gets work it is sent the base-delta log entries it has not applied yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from raysim.base_log import BaseDeltaLog
from raysim.engines.base import ClientFailure, ClientJob, ClientResult, EvalResult
from raysim.worker import ClientWorker

IN_FLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a worker: the run's config, the label count and its resource shares."""

    cfg: Any                    # ExperimentConfig
    num_labels: int
    cpus: float
    gpus: float

    @property
    def num_workers(self) -> int:
        return self.cfg.resources.num_workers


def spawn_worker(spec: WorkerSpec, index: int):
    """Start one worker actor; it imports torch and builds its model in the background."""
    return ClientWorker.options(num_cpus=spec.cpus, num_gpus=spec.gpus).remote(spec.cfg, spec.num_labels, index,
                                                                              spec.gpus)


def spawn_workers(spec: WorkerSpec) -> list:
    return [spawn_worker(spec, i) for i in range(spec.num_workers)]


@dataclass
class JobOutcome:
    status: str                           # ok | failed | straggler
    result: ClientResult | None = None
    worker: int = -1
    error: str = ""


@dataclass
class _Slot:
    handle: Any
    index: int
    base_version: int = 0
    alive: bool = True
    pending: dict = field(default_factory=dict)   # ref -> (job, attempt)


def job_cost(job: ClientJob, batch_size: int) -> float:
    """Examples passed through the model: steps × rows per batch."""
    return float(job.steps * min(len(job.train_idx), batch_size))


def plan_tasks(jobs: list[ClientJob], engine: str, cohort_size: int, batch_size: int,
               live_workers: int) -> list[list[ClientJob]]:
    """One job per task (peft engine) or cohorts of up to `cohort_size` clients of similar cost (cohort
    engine), as many cohorts as a multiple of the live workers so none idles. Largest first."""
    order = sorted(jobs, key=lambda j: (-job_cost(j, batch_size), j.client_id))
    if engine != "cohort" or len(order) <= 1:
        return [[j] for j in order]
    n = -(-len(order) // max(1, cohort_size))
    n = min(len(order), -(-n // live_workers) * live_workers)
    return [list(part) for part in np.array_split(np.array(order, dtype=object), n) if len(part)]


class _Dispatch:
    """The bookkeeping of one round's training: queued and in-flight tasks, load per worker, outcomes."""

    def __init__(self, pool: "WorkerPool", tasks: list[list[ClientJob]], max_retries: int):
        self.pool = pool
        self.max_retries = max_retries
        self.queue = [(task, 0, -1) for task in tasks]          # (task, attempt, worker to avoid)
        self.in_flight: dict[Any, tuple[_Slot, list[ClientJob], int]] = {}
        self.load: dict[int, float] = {}
        self.outcomes: dict[int, JobOutcome] = {}

    def cost(self, task: list[ClientJob]) -> float:
        return sum(self.pool._cost(j) for j in task)

    def submit(self) -> None:
        """Send queued tasks to the least-loaded live workers (at most IN_FLIGHT_PER_WORKER each)."""
        waiting = []
        for task, attempt, avoid in self.queue:
            busy: dict[int, int] = {}
            for s, _, _ in self.in_flight.values():
                busy[s.index] = busy.get(s.index, 0) + 1
            live = [s for s in self.pool.slots if s.alive and busy.get(s.index, 0) < IN_FLIGHT_PER_WORKER]
            others = [s for s in live if s.index != avoid] or live
            if not others:
                waiting.append((task, attempt, avoid))
                continue
            slot = min(others, key=lambda s: (self.load.get(s.index, 0.0), s.index))
            self.pool._sync(slot)
            self.in_flight[slot.handle.train.remote(task)] = (slot, task, attempt)
            self.load[slot.index] = self.load.get(slot.index, 0.0) + self.cost(task)
        self.queue = waiting

    def collect(self, ref) -> None:
        """One finished task: its outcomes, or a retry on another worker (a dead worker is replaced)."""
        slot, task, attempt = self.in_flight.pop(ref)
        self.load[slot.index] = self.load.get(slot.index, 0.0) - self.cost(task)
        try:
            results = ray.get(ref)
        except RayTaskError as exc:
            return self.retry_or_fail(task, attempt, slot, str(exc.cause))
        except RayActorError as exc:
            if slot.alive:
                self.pool._replace(slot)
            return self.retry_or_fail(task, attempt, slot, type(exc).__name__)
        for job, result in zip(task, results):
            if not isinstance(result, ClientFailure):
                self.outcomes[job.client_id] = JobOutcome("ok", result, slot.index)
            elif result.retryable:
                self.retry_or_fail([job], attempt, slot, result.error)
            else:
                self.outcomes[job.client_id] = JobOutcome("failed", worker=slot.index, error=result.error)

    def retry_or_fail(self, task: list[ClientJob], attempt: int, slot: _Slot, error: str) -> None:
        if attempt < self.max_retries:
            self.queue.append((task, attempt + 1, slot.index))
            return
        for job in task:
            self.outcomes[job.client_id] = JobOutcome("failed", worker=slot.index, error=error)

    def finish(self) -> dict[int, JobOutcome]:
        """Outcomes of every job: what is still running or queued is a straggler."""
        for slot, task, _ in self.in_flight.values():
            for job in task:
                self.outcomes[job.client_id] = JobOutcome("straggler", worker=slot.index)
        for task, _, _ in self.queue:
            for job in task:
                self.outcomes[job.client_id] = JobOutcome("straggler")
        return self.outcomes


def _responds(handle) -> bool:
    try:
        ray.get(handle.ping.remote(), timeout=30)
        return True
    except Exception:  # noqa: BLE001 - dead, unreachable or hung: not usable
        return False


class WorkerPool:
    def __init__(self, spec: WorkerSpec, handles: list, base_log: BaseDeltaLog, startup_timeout_s: float = 600.0):
        self.spec = spec
        self.base_log = base_log
        self.startup_timeout_s = startup_timeout_s
        self.slots = [_Slot(h, i) for i, h in enumerate(handles)]
        self.next_index = len(handles)
        self.data_ref = None

    def _spawn(self) -> _Slot:
        index = self.next_index
        self.next_index += 1
        return _Slot(spawn_worker(self.spec, index), index)

    # -- setup ------------------------------------------------------------------------------------------

    def attach_data(self, data_ref) -> None:
        """Give every worker the tokenised arrays (one object-store copy, zero-copy views)."""
        self.data_ref = data_ref
        refs = [s.handle.set_data.remote(data_ref) for s in self.slots]
        self._get_all(refs, self.startup_timeout_s, "workers did not start")

    def _get_all(self, refs, timeout_s: float, what: str):
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s (are the requested resources available?)")
        return ray.get(ready)

    def call_first(self, method: str, *args, timeout_s: float = 600.0):
        """Call a method on the first live worker and wait (deadline) for its answer."""
        slot = next(s for s in self.slots if s.alive)
        return self._get_all([getattr(slot.handle, method).remote(*args)], timeout_s, f"{method} did not answer")[0]

    def _sync(self, slot: _Slot) -> None:
        """Queue the base deltas this worker lacks; actor order guarantees they apply before later calls."""
        missing = self.base_log.since(slot.base_version)
        if missing:
            slot.handle.sync_base.remote(missing)
            slot.base_version = missing[-1][0]

    def _replace(self, slot: _Slot) -> None:
        slot.alive = False
        new = self._spawn()
        if self.data_ref is not None:
            new.handle.set_data.remote(self.data_ref)
        self.slots[self.slots.index(slot)] = new

    def kill_one(self) -> int:
        """Fault injection: kill a worker (its jobs are retried elsewhere; it is replaced)."""
        slot = self.slots[0]
        ray.kill(slot.handle, no_restart=True)
        return slot.index

    # -- training ---------------------------------------------------------------------------------------

    def _cost(self, job: ClientJob) -> float:
        return job_cost(job, self.spec.cfg.train.batch_size)

    def _tasks(self, jobs: list[ClientJob]) -> list[list[ClientJob]]:
        res = self.spec.cfg.resources
        live = max(1, sum(s.alive for s in self.slots))
        return plan_tasks(jobs, res.engine, res.cohort_size, self.spec.cfg.train.batch_size, live)

    def run_jobs(self, jobs: list[ClientJob], deadline_s: float, max_retries: int,
                 kill_after_submit: bool = False) -> dict[int, JobOutcome]:
        """Train every job; returns client id -> outcome. Never blocks past `deadline_s`.

        A task is one job (peft engine) or a cohort (cohort engine); a task that fails as a whole is
        retried on another worker, a single failed job of a cohort (e.g. out of GPU memory even alone)
        alone. What is still running at the deadline is a straggler.
        """
        deadline = time.monotonic() + deadline_s
        run = _Dispatch(self, self._tasks(jobs), max_retries)
        while run.queue or run.in_flight:
            run.submit()
            if kill_after_submit and run.in_flight:
                self.kill_one()
                kill_after_submit = False
            if not run.in_flight:
                break
            ready, _ = ray.wait(list(run.in_flight), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break                                            # deadline: the rest are stragglers
            for ref in ready:
                run.collect(ref)
        return run.finish()

    # -- evaluation -------------------------------------------------------------------------------------

    def submit_evaluation(self, factors_ref, head_ref, idx: np.ndarray, gen_idx: np.ndarray | None = None,
                          base_version: int | None = None) -> list:
        """Start the global evaluation, the test rows (and the generation rows) split in contiguous shards
        over the live workers; returns the refs of the partial `EvalResult`s (sum them)."""
        live = [s for s in self.slots if s.alive]
        shards = np.array_split(idx, len(live))
        gen = np.array_split(gen_idx, len(live)) if gen_idx is not None else [None] * len(live)
        refs = []
        for slot, shard, gen_shard in zip(live, shards, gen):
            if len(shard) or (gen_shard is not None and len(gen_shard)):
                self._sync(slot)
                refs.append(slot.handle.evaluate.remote(factors_ref, head_ref, shard, base_version, gen_shard))
        return refs

    def evaluate_now(self, factors_ref, head_ref, idx: np.ndarray, gen_idx: np.ndarray | None, base_version: int,
                     timeout_s: float, attempts: int = 3) -> EvalResult:
        """A blocking evaluation at `base_version` that survives lost workers (they are replaced and the
        evaluation is repeated on the live ones)."""
        for _ in range(attempts):
            refs = self.submit_evaluation(factors_ref, head_ref, idx, gen_idx, base_version)
            try:
                return EvalResult.total(self._get_all(refs, timeout_s, "evaluation did not finish"))
            except RayActorError:
                for slot in [s for s in self.slots if s.alive and not _responds(s.handle)]:
                    self._replace(slot)
        raise RuntimeError(f"evaluation failed {attempts} times: workers keep dying")

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
