"""WorkerPool: dispatches client jobs to the ClientWorker actors.

Dispatch keeps every worker busy and the slowest one short: jobs are sorted by cost (largest
first) and each goes to the worker with the least outstanding work, with up to two tasks in flight
per worker so the next one is queued before the current one finishes. With the cohort engine a task
is a cohort: clients of similar cost grouped up to `resources.cohort_size`. Every wait has a deadline.
A job whose worker died or raised is retried on another worker; a dead worker is replaced (see
raysim.membership: replacements are waited for with a deadline, the pool shrinks when the cluster has no
room). Before a worker gets work it is sent the base-delta log entries it has not applied yet.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from raysim.base_log import BaseDeltaLog
from raysim.engines.base import ClientFailure, ClientJob, ClientResult, EvalResult
from raysim.membership import Membership, Slot
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
    """Start one worker actor; it imports torch and builds its model in the background. Workers are spread
    over the nodes, so losing one node costs as few of them as possible (inside a placement group, e.g. a
    Tune trial's, they stay in the group's bundles instead)."""
    from ray.util import get_current_placement_group

    spread = {} if get_current_placement_group() is not None else {"scheduling_strategy": "SPREAD"}
    return ClientWorker.options(num_cpus=spec.cpus, num_gpus=spec.gpus, **spread).remote(
        spec.cfg, spec.num_labels, index, spec.gpus)


def spawn_workers(spec: WorkerSpec) -> list:
    return [spawn_worker(spec, i) for i in range(spec.num_workers)]


@dataclass
class JobOutcome:
    status: str                           # ok | failed | straggler
    result: ClientResult | None = None
    worker: int = -1
    error: str = ""


def job_cost(job: ClientJob, batch_size: int) -> float:
    """Examples passed through the model: steps × rows per batch."""
    return float(job.steps * min(len(job.train_idx), batch_size))


def task_cap(cohort_size: int | str, gpu: bool = False) -> int:
    """Most clients per task: `resources.cohort_size`, or with `auto` the largest calibration candidate of the
    device (each worker splits a task into cohorts of the size it measured fastest)."""
    from raysim.engines.calibrate import candidates

    return max(candidates(gpu)) if cohort_size == "auto" else int(cohort_size)


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
        self.in_flight: dict[Any, tuple[Slot, list[ClientJob], int]] = {}
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
            live = [s for s in self.pool.members.usable() if busy.get(s.index, 0) < IN_FLIGHT_PER_WORKER]
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
        except RayActorError:
            # the worker (or its node) was lost, not the clients: they go to another worker, without using up
            # max_task_retries (each loss removes a worker, and the round's deadline bounds the rest)
            self.pool.members.replace(slot)
            self.queue.append((task, attempt, slot.index))
            return
        for job, result in zip(task, results):
            if not isinstance(result, ClientFailure):
                self.outcomes[job.client_id] = JobOutcome("ok", result, slot.index)
            elif result.status == "straggler":
                self.outcomes[job.client_id] = JobOutcome("straggler", worker=slot.index, error=result.error)
            elif result.retryable:
                self.retry_or_fail([job], attempt, slot, result.error)
            else:
                self.outcomes[job.client_id] = JobOutcome("failed", worker=slot.index, error=result.error)

    def retry_or_fail(self, task: list[ClientJob], attempt: int, slot: Slot, error: str) -> None:
        if attempt < self.max_retries:
            self.queue.append((task, attempt + 1, slot.index))
            return
        for job in task:
            self.outcomes[job.client_id] = JobOutcome("failed", worker=slot.index, error=error)

    def finish(self) -> dict[int, JobOutcome]:
        """Outcomes of every job: what is still running or queued is a straggler. Running tasks are cancelled
        (a job that has not started by the deadline is skipped by the worker; see `ClientJob.deadline`)."""
        late = "still training at the round deadline (federation.round_timeout_s)"
        for ref, (slot, task, _) in self.in_flight.items():
            ray.cancel(ref)
            self.pool.stale[ref] = (slot, time.monotonic())
            for job in task:
                self.outcomes[job.client_id] = JobOutcome("straggler", worker=slot.index, error=late)
        for task, _, _ in self.queue:
            for job in task:
                self.outcomes[job.client_id] = JobOutcome("straggler", error="no live worker before the deadline")
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
        self.members = Membership(spec, handles, spec.cfg.resources.worker_start_timeout_s, spawn_worker)
        self.stale: dict = {}            # straggler task ref -> (slot, when the round gave up on it)
        self.replaced_hung = 0

    # -- setup ------------------------------------------------------------------------------------------

    def attach_data(self, data_ref, per_client=None) -> None:
        """Give every worker the tokenised arrays (one object-store copy, zero-copy views) and, for per-client
        data, the source each worker reads or generates its clients' examples from."""
        self.members.data_args = (data_ref, None if per_client is None else ray.put(per_client))
        refs = [s.handle.set_data.remote(*self.members.data_args) for s in self.members.slots]
        self._get_all(refs, self.startup_timeout_s, "workers did not start")

    def _get_all(self, refs, timeout_s: float, what: str):
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s (are the requested resources available?)")
        return ray.get(ready)

    def _usable(self, timeout_s: float) -> list[Slot]:
        """The usable workers, waiting (deadline) for a starting one when none is."""
        if not self.members.wait_usable(timeout_s):
            raise TimeoutError(f"no worker available within {timeout_s:.0f} s (workers lost and the cluster has no "
                               "room for replacements)")
        return self.members.usable()

    def call_first(self, method: str, *args, timeout_s: float = 600.0):
        """Call a method on the first usable worker and wait (deadline) for its answer."""
        slot = self._usable(timeout_s)[0]
        return self._get_all([getattr(slot.handle, method).remote(*args)], timeout_s, f"{method} did not answer")[0]

    def call_live(self, method: str, *args, timeout_s: float = 600.0, attempts: int = 3):
        """`call_first` that survives lost or hung workers: they are replaced and the call is repeated."""
        for _ in range(attempts - 1):
            try:
                return self.call_first(method, *args, timeout_s=timeout_s)
            except (RayActorError, TimeoutError):
                self._replace_unresponsive()
        return self.call_first(method, *args, timeout_s=timeout_s)

    def cohort_calibrations(self, timeout_s: float = 60.0) -> dict[int, dict]:
        """Worker index -> what `resources.cohort_size: auto` measured there (workers that trained no cohort,
        or did not answer in time, are left out)."""
        slots = self.members.usable()
        refs = [s.handle.cohort_calibration.remote() for s in slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = {}
        for slot, ref in zip(slots, refs):
            with contextlib.suppress(RayActorError):
                if ref in ready and (found := ray.get(ref)) is not None:
                    out[slot.index] = found
        return out

    def _replace_unresponsive(self) -> None:
        for slot in [s for s in self.members.usable() if not _responds(s.handle)]:
            self.members.replace(slot)

    def synced_version(self) -> int:
        """The oldest base version a worker that holds any has been sent (0 when none holds one): the base log
        may merge its entries up to here without a worker ever applying a change twice."""
        return min((s.base_version for s in self.members.slots if s.base_version > 0), default=0)

    def _sync(self, slot: Slot) -> None:
        """Queue the base deltas this worker lacks; actor order guarantees they apply before later calls."""
        missing = self.base_log.since(slot.base_version)
        if missing:
            slot.handle.sync_base.remote(missing)
            slot.base_version = missing[-1][0]

    def replace_hung(self, hung_after_s: float) -> None:
        """Health check: a worker still busy with a straggler task `hung_after_s` after its round gave up on it
        is hung (its jobs stop at the deadline, so it should not be): kill it and start a fresh one."""
        if not self.stale:
            return
        done, _ = ray.wait(list(self.stale), num_returns=len(self.stale), timeout=0)
        for ref in done:
            self.stale.pop(ref)
        now = time.monotonic()
        for ref, (slot, since) in list(self.stale.items()):
            if now - since < hung_after_s:
                continue
            self.stale.pop(ref)
            if slot.alive:
                self.members.replace(slot)
                self.replaced_hung += 1

    def kill_one(self) -> int | None:
        """Fault injection: kill a usable worker (its jobs are retried elsewhere; it is replaced)."""
        usable = self.members.usable()
        if not usable:
            return None
        ray.kill(usable[0].handle, no_restart=True)
        return usable[0].index

    # -- training ---------------------------------------------------------------------------------------

    def _cost(self, job: ClientJob) -> float:
        return job_cost(job, self.spec.cfg.train.batch_size)

    def _tasks(self, jobs: list[ClientJob]) -> list[list[ClientJob]]:
        res = self.spec.cfg.resources
        live = max(1, len(self.members.usable()))
        cap = task_cap(res.cohort_size, gpu=self.spec.gpus > 0)
        return plan_tasks(jobs, res.engine, cap, self.spec.cfg.train.batch_size, live)

    def run_jobs(self, jobs: list[ClientJob], deadline_s: float, max_retries: int,
                 kill_after_submit: bool = False) -> dict[int, JobOutcome]:
        """Train every job; returns client id -> outcome. Never blocks past `deadline_s`.

        A task is one job (peft engine) or a cohort (cohort engine); a task that fails as a whole is
        retried on another worker, a single failed job of a cohort (e.g. out of GPU memory even alone)
        alone. What is still running at the deadline is a straggler.
        """
        self.replace_hung(self.spec.cfg.federation.hung_after_s)
        self.members.top_up()                                   # workers lost earlier: ask again
        deadline = time.monotonic() + deadline_s
        run = _Dispatch(self, self._tasks(jobs), max_retries)
        while run.queue or run.in_flight:
            run.submit()
            if kill_after_submit and run.in_flight:
                self.kill_one()
                kill_after_submit = False
            if not run.in_flight:                                # no usable worker: wait for one to start
                if run.queue and self.members.wait_usable(max(0.0, deadline - time.monotonic())):
                    continue
                break
            ready, _ = ray.wait(list(run.in_flight), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break                                            # deadline: the rest are stragglers
            for ref in ready:
                run.collect(ref)
        return run.finish()

    # -- evaluation -------------------------------------------------------------------------------------

    def submit_evaluation(self, factors_ref, head_ref, delta_ref, idx: np.ndarray, gen_idx: np.ndarray | None = None,
                          base_version: int | None = None) -> list:
        """Start the global evaluation, the test rows (and the generation rows) split in contiguous shards
        over the live workers; returns the refs of the partial `EvalResult`s (sum them)."""
        live = self._usable(self.startup_timeout_s)
        shards = np.array_split(idx, len(live))
        gen = np.array_split(gen_idx, len(live)) if gen_idx is not None else [None] * len(live)
        refs = []
        for slot, shard, gen_shard in zip(live, shards, gen):
            if len(shard) or (gen_shard is not None and len(gen_shard)):
                self._sync(slot)
                refs.append(slot.handle.evaluate.remote(factors_ref, head_ref, shard, base_version, gen_shard, delta_ref))
        return refs

    def submit_clients_evaluation(self, items: list[tuple]) -> list:
        """Start a personalised evaluation: (client id, factors, head, local test rows) items split over the live
        workers; returns refs of [(client id, EvalResult)] lists."""
        live = self._usable(self.startup_timeout_s)
        refs = []
        for slot, part in zip(live, np.array_split(np.arange(len(items)), len(live))):
            if len(part):
                self._sync(slot)
                refs.append(slot.handle.evaluate_clients.remote([items[i] for i in part]))
        return refs

    def evaluate_clients_now(self, items: list[tuple], timeout_s: float, attempts: int = 3) -> list:
        """A blocking `submit_clients_evaluation` that survives lost workers (replaced, then repeated)."""
        for _ in range(attempts):
            refs = self.submit_clients_evaluation(items)
            try:
                return [pair for part in self._get_all(refs, timeout_s, "evaluation did not finish") for pair in part]
            except (RayActorError, TimeoutError):
                self._replace_unresponsive()
        raise RuntimeError(f"personalised evaluation failed {attempts} times: workers keep dying or hanging")

    def evaluate_now(self, factors_ref, head_ref, delta_ref, idx: np.ndarray, gen_idx: np.ndarray | None,
                     base_version: int, timeout_s: float, attempts: int = 3) -> EvalResult:
        """A blocking evaluation at `base_version` that survives lost workers (they are replaced and the
        evaluation is repeated on the live ones)."""
        for _ in range(attempts):
            refs = self.submit_evaluation(factors_ref, head_ref, delta_ref, idx, gen_idx, base_version)
            try:
                return EvalResult.total(self._get_all(refs, timeout_s, "evaluation did not finish"))
            except (RayActorError, TimeoutError):
                self._replace_unresponsive()
        raise RuntimeError(f"evaluation failed {attempts} times: workers keep dying or hanging")

    def shutdown(self) -> None:
        self.members.shutdown()
