"""Fault injection, in one place: which clients drop out, run slow or upload a corrupt update in a round,
and when a worker dies.

Decisions are drawn from the run seed, the round and the client (stream `seeds.FAULTS`), so the same
clients fail in a resumed run and in an uninterrupted one. The coordinator attaches each client's
`ClientFault` to its job; the worker applies it before any engine sees the job (`apply_faults`) and
breaks the corrupt clients' results after training (`corrupt_results`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from raysim.engines.base import ClientFailure, ClientFault, ClientJob, ClientResult
from raysim.seeds import FAULTS, rng


class FaultInjector:
    def __init__(self, faults_cfg, seed: int):
        self.cfg = faults_cfg
        self.seed = seed

    def for_client(self, rnd: int, client_id: int) -> ClientFault:
        draw = rng(self.seed, rnd, client_id, FAULTS)
        u = draw.random()                    # one uniform: drop_rate and corrupt_rate pick disjoint clients, so a
        drop = bool(u < self.cfg.drop_rate)  # run with corrupt_rate p rejects exactly who drop_rate p drops
        corrupt = self.cfg.drop_rate <= u < self.cfg.drop_rate + self.cfg.corrupt_rate
        slow = bool(draw.random() < self.cfg.slow_fraction)
        return ClientFault(drop=drop, delay_s=self.cfg.slow_client_s if slow else 0.0,
                           corrupt=self.cfg.corrupt_kind if corrupt else None)

    def kill_worker_in(self, rnd: int, phase: str = "train") -> bool:
        """Whether a worker is killed in this phase (train | evaluation) of round `rnd`; the pool replaces it
        and its work is done again elsewhere."""
        every = self.cfg.kill_worker_every
        due = self.cfg.kill_worker_at_round == rnd or (every is not None and rnd % every == 0)
        return due and self.cfg.kill_worker_phase == phase


def apply_faults(jobs: list[ClientJob]) -> tuple[list[ClientJob], dict[int, ClientFailure]]:
    """(jobs that train, client id -> failure of the others). A task waits for its slowest client, but never
    past the round's deadline: jobs that would start after it are stragglers and do not keep the worker busy."""
    failed = {j.client_id: ClientFailure(j.client_id, f"client {j.client_id} dropped out (faults.drop_rate)",
                                         simulated=True) for j in jobs if j.fault.drop}
    live = [j for j in jobs if not j.fault.drop]
    delay = max((j.fault.delay_s for j in live), default=0.0)
    deadline = min((j.deadline for j in live if j.deadline is not None), default=None)
    if delay > 0:
        time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.time())))
    if deadline is not None and time.time() >= deadline:
        failed.update({j.client_id: missed_deadline(j.client_id) for j in live})
        live = []
    return live, failed


def missed_deadline(client_id: int) -> ClientFailure:
    """The failure of a job skipped because its round's deadline passed before it could start."""
    return ClientFailure(client_id, "not started before the round deadline (federation.round_timeout_s)",
                         status="straggler")


def corrupt_results(jobs: list[ClientJob], results: list) -> list:
    """Break the results of the jobs marked corrupt (faults.corrupt_rate) the way faults.corrupt_kind says."""
    kinds = {j.client_id: (j.fault.corrupt, j) for j in jobs if j.fault.corrupt}
    return [_corrupt(r, *kinds[r.client_id]) if isinstance(r, ClientResult) and r.client_id in kinds else r
            for r in results]


def _corrupt(result: ClientResult, kind: str, job: ClientJob) -> ClientResult:
    factors = dict(result.factors)
    name = next(iter(factors))
    key = sorted(job.train)[0]
    value = np.array(getattr(factors[name], key), copy=True)
    if kind in ("nan", "inf"):
        value.flat[0] = np.nan if kind == "nan" else np.inf
        factors[name] = replace(factors[name], **{key: value})
    elif kind == "shape":
        factors[name] = replace(factors[name], **{key: value[:-1]})
    else:                                               # huge: the whole change scaled by 1e6
        for mod, f in factors.items():
            start = getattr(job.start[mod], key)
            factors[mod] = replace(f, **{key: (start + 1e6 * (getattr(f, key) - start)).astype(np.float32)})
    return replace(result, factors=factors)
