"""The pool's workers: which are usable, which are still starting, and how lost ones are replaced.

A worker is usable once it holds the data. A lost worker (its node gone, its process dead, or hung) is
replaced by a fresh actor that is waited for with a deadline (`resources.worker_start_timeout_s`): when
the cluster has no room for it by then, the attempt is given up and the pool runs on with fewer workers
(rounds.parquet's `workers` column records how many were usable). Every round the pool asks again for
the workers it lacks, up to `resources.num_workers`, so capacity that comes back (a node that joins) is
used. Nothing is ever sent to a worker that has not started: no task waits on a pending actor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray


@dataclass
class Slot:
    handle: Any
    index: int
    base_version: int = 0          # the base-delta log version this worker has been sent
    alive: bool = True
    ready: bool = True             # holds the data (a replacement is not ready until its set_data answers)
    ready_ref: Any = None
    started: float = 0.0


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class Membership:
    def __init__(self, spec, handles: list, start_timeout_s: float, spawn_worker):
        self.spawn_worker = spawn_worker       # (spec, index) -> actor handle
        self.spec = spec
        self.start_timeout_s = start_timeout_s
        self.slots = [Slot(h, i) for i, h in enumerate(handles)]
        self.next_index = len(handles)
        self.data_args: tuple | None = None     # what set_data gets: (arrays ref, per-client source ref)
        self.given_up = 0              # replacements that never started (no capacity)

    def usable(self) -> list[Slot]:
        return [s for s in self.slots if s.alive and s.ready]

    def spawn(self) -> Slot:
        """A new worker, not usable until it holds the data."""
        slot = Slot(self.spawn_worker(self.spec, self.next_index), self.next_index, ready=False,
                    started=time.monotonic())
        self.next_index += 1
        slot.ready_ref = slot.handle.set_data.remote(*self.data_args)
        self.slots.append(slot)
        return slot

    def replace(self, slot: Slot) -> None:
        """Drop a lost or hung worker and start another in its place (if the pool is below its size)."""
        if not slot.alive:
            return
        slot.alive = False
        self.slots.remove(slot)
        _kill(slot.handle)
        self.top_up()

    def top_up(self) -> None:
        """Poll the starting workers; ask for new ones up to resources.num_workers."""
        self.poll()
        while len(self.slots) < self.spec.num_workers and self.data_args is not None:
            self.spawn()

    def poll(self) -> None:
        """Starting workers become usable once their data has arrived; one that failed, or that the cluster
        could not place within the start deadline, is given up."""
        for slot in [s for s in self.slots if not s.ready]:
            done, _ = ray.wait([slot.ready_ref], timeout=0)
            if done:
                try:
                    ray.get(slot.ready_ref)
                    slot.ready = True
                    continue
                except Exception:  # noqa: BLE001 - it died while starting: give it up
                    pass
            elif time.monotonic() - slot.started < self.start_timeout_s:
                continue
            self.slots.remove(slot)
            _kill(slot.handle)
            self.given_up += 1

    def wait_usable(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until some worker is usable; False if none became so."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if self.usable():
                return True
            starting = [s.ready_ref for s in self.slots if not s.ready]
            left = deadline - time.monotonic()
            if not starting or left <= 0:
                return False
            ray.wait(starting, num_returns=1, timeout=min(left, 1.0))

    def shutdown(self) -> None:
        for slot in self.slots:
            _kill(slot.handle)
