"""`resources.cohort_size: auto`: the cohort size a worker trains fastest with, measured on its own first jobs.

How many clients the cohort engine should stack depends on the model, the batch shape, the device and how
busy the machine is: on a small CPU model stacking gains 10–30 %, on a GPU it gains many times, and at
some size the stacked tensors stop fitting the caches. A worker with `auto` times one short training call
per candidate size on the jobs of its first cohort (the same data, start adapters and step count, at most
CALIBRATION_STEPS steps; the results are thrown away) and keeps the fastest. Size 1 is the PEFT engine's
path, so the cohort engine is never slower than the PEFT engine by more than the measurement's noise.
The choice is reported in summary.json. Cohorts of different sizes give the same updates up to float
round-off, so a run with `auto` reproduces to round-off; for a bit-for-bit repeat, set the reported size.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

CANDIDATES = (1, 2, 4, 8, 16)                 # on a CPU; the largest is also the pool's cap on a task
GPU_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)      # on a GPU, stacking pays off up to much larger cohorts
CALIBRATION_STEPS = 2                          # local steps per client in a timing call


def candidates(gpu: bool) -> tuple[int, ...]:
    return GPU_CANDIDATES if gpu else CANDIDATES


@dataclasses.dataclass
class Calibration:
    cohort_size: int                          # the fastest candidate
    client_steps_per_s: dict[int, float]      # every candidate timed, by cohort size

    def as_dict(self) -> dict:
        return {"cohort_size": self.cohort_size,
                "client_steps_per_s": {str(k): round(v, 2) for k, v in self.client_steps_per_s.items()}}


def calibrate(train: Callable[[list], object], jobs: Sequence, sizes: Sequence[int] = CANDIDATES,
              steps: int = CALIBRATION_STEPS, clock: Callable[[], float] = time.perf_counter,
              too_big: tuple[type[BaseException], ...] = ()) -> Calibration:
    """Time `train(cohort)` for each size of `sizes` that `jobs` can fill (1 always), with each job cut to at
    most `steps` local steps: one untimed warm-up call, then one timed call. A size whose call raises one of
    `too_big` (out of device memory) ends the search. Returns the fastest size (the smaller one on a tie)
    and the rate of every size timed."""
    short = [dataclasses.replace(job, steps=min(job.steps, steps), deadline=None) for job in jobs]
    rates: dict[int, float] = {}
    for k in sorted({1, *(c for c in sizes if 1 <= c <= len(short))}):
        cohort = short[:k]
        try:
            train(cohort)                                     # warm-up: allocations, caches, lazy set-up
        except too_big:
            if k == 1:
                raise
            break
        t0 = clock()
        train(cohort)
        elapsed = max(clock() - t0, 1e-9)
        rates[k] = sum(job.steps for job in cohort) / elapsed
    best = max(rates, key=lambda k: (rates[k], -k))
    return Calibration(best, rates)


def chunks(jobs: list, size: int) -> list[list]:
    """`jobs` in consecutive cohorts of at most `size`."""
    return [jobs[i:i + size] for i in range(0, len(jobs), max(1, size))]
