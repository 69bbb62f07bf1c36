"""Fault injection, in one place: which clients drop out or run slow in a round, and when a worker dies.

Decisions are drawn from the run seed, the round and the client (stream `seeds.FAULTS`), so the same
clients fail in a resumed run and in an uninterrupted one. The coordinator attaches each client's
`ClientFault` to its job; the worker applies it before any engine sees the job (`apply_faults`).
"""

from __future__ import annotations

import time

from raysim.engines.base import ClientFailure, ClientFault, ClientJob
from raysim.seeds import FAULTS, rng


class FaultInjector:
    def __init__(self, faults_cfg, seed: int):
        self.cfg = faults_cfg
        self.seed = seed

    def for_client(self, rnd: int, client_id: int) -> ClientFault:
        draw = rng(self.seed, rnd, client_id, FAULTS)
        drop = bool(draw.random() < self.cfg.drop_rate)
        slow = bool(draw.random() < self.cfg.slow_fraction)
        return ClientFault(drop=drop, delay_s=self.cfg.slow_client_s if slow else 0.0)

    def kill_worker_in(self, rnd: int) -> bool:
        """Whether a worker is killed while round `rnd` trains (its jobs are retried, it is replaced)."""
        return self.cfg.kill_worker_at_round == rnd


def apply_faults(jobs: list[ClientJob]) -> tuple[list[ClientJob], dict[int, ClientFailure]]:
    """(jobs that train, client id -> failure of the dropped ones). A task waits for its slowest client."""
    dropped = {j.client_id: ClientFailure(j.client_id, f"client {j.client_id} dropped out (faults.drop_rate)",
                                          simulated=True) for j in jobs if j.fault.drop}
    live = [j for j in jobs if not j.fault.drop]
    delay = max((j.fault.delay_s for j in live), default=0.0)
    if delay > 0:
        time.sleep(delay)
    return live, dropped
