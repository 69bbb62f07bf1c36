"""raysim.engines.calibrate: `resources.cohort_size: auto` picks the size with the most client-steps per second."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from raysim.engines.calibrate import CANDIDATES, calibrate, candidates, chunks


@dataclass(frozen=True)
class Job:
    client_id: int
    steps: int = 4
    deadline: float | None = 123.0


class FakeDevice:
    """A clock that advances by the modelled cost of each training call: `overhead` per call plus
    `per_step(k)` per client-step for a cohort of k."""

    def __init__(self, overhead: float, per_step):
        self.now, self.calls = 0.0, []
        self.overhead, self.per_step = overhead, per_step

    def clock(self) -> float:
        return self.now

    def train(self, jobs) -> None:
        self.calls.append(list(jobs))
        self.now += self.overhead + self.per_step(len(jobs)) * sum(j.steps for j in jobs)


@pytest.mark.parametrize("per_step,want", [
    (lambda k: 1.0 / min(k, 4), 4),             # stacking helps up to 4, then nothing: the smaller size wins
    (lambda k: 1.0 + 0.1 * k, 1),               # stacking only costs: the PEFT path
    (lambda k: 1.0 / k, 16),                    # the more the better, up to the largest candidate
])
def test_the_fastest_size_is_chosen(per_step, want):
    dev = FakeDevice(0.0, per_step)
    cal = calibrate(dev.train, [Job(i) for i in range(20)], clock=dev.clock)
    assert cal.cohort_size == want
    assert set(cal.client_steps_per_s) == set(CANDIDATES)
    assert cal.client_steps_per_s[1] == pytest.approx(1 / per_step(1))


def test_only_sizes_the_jobs_can_fill_are_timed_with_short_jobs_and_no_deadline():
    dev = FakeDevice(0.5, lambda k: 1.0 / k)
    jobs = [Job(i, steps=5) for i in range(5)]
    cal = calibrate(dev.train, jobs, clock=dev.clock)
    assert set(cal.client_steps_per_s) == {1, 2, 4}
    assert [len(c) for c in dev.calls] == [1, 1, 2, 2, 4, 4]                  # warm-up, then timed, per size
    assert all(j.steps == 2 and j.deadline is None for c in dev.calls for j in c)
    assert all(j.steps == 5 and j.deadline == 123.0 for j in jobs)           # the caller's jobs are untouched
    assert cal.as_dict()["cohort_size"] == 4 and set(cal.as_dict()["client_steps_per_s"]) == {"1", "2", "4"}


def test_one_job_times_the_peft_path_only():
    dev = FakeDevice(0.0, lambda k: 1.0)
    assert calibrate(dev.train, [Job(0)], clock=dev.clock).cohort_size == 1


class OutOfMemory(Exception):
    pass


def test_a_size_that_runs_out_of_memory_ends_the_search():
    dev = FakeDevice(0.0, lambda k: 1.0 / k)

    def train(jobs):
        if len(jobs) >= 32:
            raise OutOfMemory
        dev.train(jobs)

    jobs = [Job(i) for i in range(64)]
    cal = calibrate(train, jobs, candidates(gpu=True), clock=dev.clock, too_big=(OutOfMemory,))
    assert cal.cohort_size == 16 and set(cal.client_steps_per_s) == {1, 2, 4, 8, 16}
    with pytest.raises(OutOfMemory):                           # not even one client fits: a real error
        calibrate(lambda jobs: (_ for _ in ()).throw(OutOfMemory()), jobs, too_big=(OutOfMemory,))


def test_chunks():
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([1, 2], 1) == [[1], [2]]
