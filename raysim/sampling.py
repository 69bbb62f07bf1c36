"""Who trains each round, and seeds derived from (run seed, round, client) so results never depend on
which worker ran a client or in which order results arrived."""

from __future__ import annotations

import numpy as np

from raysim.seeds import SAMPLING, derive_seed


class ClientSampler:
    """Uniform sampling without replacement of `per_round` of `num_clients` clients, seeded per round."""

    def __init__(self, num_clients: int, per_round: int, seed: int):
        if not 1 <= per_round <= num_clients:
            raise ValueError(f"per_round must be in [1, {num_clients}]")
        self.num_clients = num_clients
        self.per_round = per_round
        self.seed = seed

    def sample(self, rnd: int) -> list[int]:
        if self.per_round == self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng(derive_seed(self.seed, rnd, SAMPLING))
        return sorted(int(c) for c in rng.choice(self.num_clients, size=self.per_round, replace=False))
