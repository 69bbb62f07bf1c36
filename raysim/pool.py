"""WorkerPool: creates ClientWorker actors and dispatches client jobs to them.

Dispatch keeps every worker busy and the slowest one short: jobs are sorted by cost (largest
first) and each goes to the worker with the least outstanding work, with up to two tasks in flight
per worker so the next one is queued before the current one finishes. With the cohort engine a task
is a cohort: clients of similar cost grouped up to `resources.cohort_size`. Every wait has a deadline.
A job whose worker died or raised is retried on another worker; a dead worker is replaced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from raysim.engines.base import ClientJob, ClientResult, EvalResult, SimulatedClientFailure
from raysim.worker import ClientWorker

IN_FLIGHT_PER_WORKER = 2


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


class WorkerPool:
    def __init__(self, cfg_dict: dict, num_labels: int, num_workers: int, cpus: float, gpus: float,
                 startup_timeout_s: float = 600.0):
        self.cfg_dict = cfg_dict
        self.num_labels = num_labels
        self.cpus = cpus
        self.gpus = gpus
        self.startup_timeout_s = startup_timeout_s
        self.next_index = 0
        self.slots = [self._spawn() for _ in range(num_workers)]
        self.data_ref = None
        self.base_log: list[tuple[int, dict]] = []

    def _spawn(self) -> _Slot:
        index = self.next_index
        self.next_index += 1
        handle = ClientWorker.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(
            self.cfg_dict, self.num_labels, index, self.gpus)
        return _Slot(handle, index)

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

    def record_base_delta(self, version: int, per_module: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.base_log.append((version, per_module))

    def _sync(self, slot: _Slot) -> None:
        """Queue the base deltas this worker lacks; actor order guarantees they apply before later calls."""
        missing = [(v, d) for v, d in self.base_log if v > slot.base_version]
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
        """Examples passed through the model: steps × rows per batch."""
        return float(job.steps * min(len(job.train_idx), int(self.cfg_dict["train"]["batch_size"])))

    def _tasks(self, jobs: list[ClientJob]) -> list[list[ClientJob]]:
        """One job per task (peft engine) or cohorts of up to `resources.cohort_size` clients of similar
        cost (cohort engine), as many cohorts as a multiple of the live workers so none idles."""
        order = sorted(jobs, key=lambda j: (-self._cost(j), j.client_id))
        res = self.cfg_dict.get("resources", {})
        if res.get("engine", "peft") != "cohort" or len(order) <= 1:
            return [[j] for j in order]
        live = max(1, sum(s.alive for s in self.slots))
        size = max(1, int(res.get("cohort_size", 8)))
        n = -(-len(order) // size)
        n = min(len(order), -(-n // live) * live)
        return [list(part) for part in np.array_split(np.array(order, dtype=object), n) if len(part)]

    def run_jobs(self, jobs: list[ClientJob], deadline_s: float, max_retries: int,
                 kill_after_submit: bool = False) -> dict[int, JobOutcome]:
        """Train every job; returns client id -> outcome. Never blocks past `deadline_s`.

        A task is one job (peft engine) or a cohort (cohort engine); a task that fails as a whole is
        retried on another worker, a single failed job of a cohort (e.g. out of GPU memory even alone)
        alone.
        """
        from raysim.worker import ClientFailure

        deadline = time.monotonic() + deadline_s
        queue = [(task, 0, -1) for task in self._tasks(jobs)]
        outcomes: dict[int, JobOutcome] = {}
        in_flight: dict[Any, tuple[_Slot, list[ClientJob], int]] = {}
        load = {s.index: 0.0 for s in self.slots}
        killed = False

        def retry_or_fail(task, attempt, slot, error):
            if attempt < max_retries:
                queue.append((task, attempt + 1, slot.index))
            else:
                for job in task:
                    outcomes[job.client_id] = JobOutcome("failed", worker=slot.index, error=error)

        while queue or in_flight:
            queue = self._submit(queue, in_flight, load)
            if kill_after_submit and not killed and in_flight:
                self.kill_one()
                killed = True
            remaining = deadline - time.monotonic()
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.0, remaining))
            if not ready:
                break                                            # deadline: the rest are stragglers
            for ref in ready:
                slot, task, attempt = in_flight.pop(ref)
                load[slot.index] = load.get(slot.index, 0.0) - sum(self._cost(j) for j in task)
                try:
                    results = ray.get(ref)
                except RayTaskError as exc:
                    if isinstance(exc.cause, SimulatedClientFailure) and len(task) == 1:
                        outcomes[task[0].client_id] = JobOutcome("failed", worker=slot.index, error=str(exc.cause))
                    else:
                        retry_or_fail(task, attempt, slot, str(exc.cause))
                    continue
                except RayActorError as exc:
                    if slot.alive:
                        self._replace(slot)
                    retry_or_fail(task, attempt, slot, type(exc).__name__)
                    continue
                for job, result in zip(task, results):
                    if not isinstance(result, ClientFailure):
                        outcomes[job.client_id] = JobOutcome("ok", result, slot.index)
                    elif result.retryable:
                        retry_or_fail([job], attempt, slot, result.error)
                    else:
                        outcomes[job.client_id] = JobOutcome("failed", worker=slot.index, error=result.error)
        for slot, task, _ in in_flight.values():
            for job in task:
                outcomes[job.client_id] = JobOutcome("straggler", worker=slot.index)
        for task, _, _ in queue:
            for job in task:
                outcomes[job.client_id] = JobOutcome("straggler")
        return outcomes

    def _submit(self, queue, in_flight, load):
        """Send queued tasks to the least-loaded live workers (at most IN_FLIGHT_PER_WORKER each)."""
        waiting = []
        for task, attempt, avoid in queue:
            busy = {}
            for s, _, _ in in_flight.values():
                busy[s.index] = busy.get(s.index, 0) + 1
            live = [s for s in self.slots if s.alive and busy.get(s.index, 0) < IN_FLIGHT_PER_WORKER]
            others = [s for s in live if s.index != avoid] or live
            if not others:
                waiting.append((task, attempt, avoid))
                continue
            slot = min(others, key=lambda s: (load.get(s.index, 0.0), s.index))
            self._sync(slot)
            ref = slot.handle.train.remote(task)
            in_flight[ref] = (slot, task, attempt)
            load[slot.index] = load.get(slot.index, 0.0) + sum(self._cost(j) for j in task)
        return waiting

    # -- evaluation -------------------------------------------------------------------------------------

    def evaluate(self, factors_ref, head_ref, idx: np.ndarray, timeout_s: float) -> EvalResult:
        """Global evaluation, the test rows split in contiguous shards over the live workers."""
        live = [s for s in self.slots if s.alive]
        shards = [s for s in np.array_split(idx, len(live)) if len(s)]
        refs = []
        for slot, shard in zip(live, shards):
            self._sync(slot)
            refs.append(slot.handle.evaluate.remote(factors_ref, head_ref, shard))
        total = EvalResult(0.0, 0, 0)
        for part in self._get_all(refs, timeout_s, "evaluation did not finish"):
            total = total + part
        return total

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
