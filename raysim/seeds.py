"""Every random stream of a run, in one place.

All randomness is derived from the run seed plus fixed stream numbers (and, where it varies, the round
and the client), so a result never depends on which worker ran a client, in which order results
arrived, or whether the run was resumed. Changing a number here changes every result that uses it.
"""

from __future__ import annotations

import zlib

import numpy as np

# stream numbers (arbitrary but fixed forever)
SAMPLING = 0xC11E         # which clients train in a round:      (seed, round, SAMPLING)
FAULTS = 0xFA17           # injected drop-outs and slow clients: (seed, round, client, FAULTS)
LABEL_NOISE = 0x4015E     # noisy clients and their label flips: (seed, LABEL_NOISE[, client])
RANK_TIERS = 0x7A2C       # which clients get which rank tier:   (seed, RANK_TIERS)
RANK_QUALITY = 0x7A2D     # quality scores for by_quality ranks: (seed, RANK_QUALITY)
TEST_SPLIT = 1            # the global test split:               default_rng([seed, TEST_SPLIT])
LOCAL_SPLIT = 2           # clients' local test splits:          default_rng([seed, LOCAL_SPLIT])
SYNTHETIC = 0x5EED        # synthetic data sources:              default_rng([seed, SYNTHETIC])
EVAL_SUBSET = 0xE7A1      # test examples evaluated by generation (eval.max_examples): default_rng([seed, EVAL_SUBSET])
# per-client data (raysim.data.per_client)
CLIENT_SIZES = 0x5E5E     # synthetic client sizes, all clients at once: default_rng([seed, CLIENT_SIZES])
SYNTHETIC_CLIENT = 0x5EEC # one synthetic client's examples:  default_rng([seed, SYNTHETIC_CLIENT, client])
CLIENT_CHOICE = 0xC40C    # held-out and training clients of a dataset: default_rng([seed, CLIENT_CHOICE])
CLIENT_LOCAL_SPLIT = 0x10C2  # one client's local test split: default_rng([seed, CLIENT_LOCAL_SPLIT, client])


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (e.g. run seed, round, client id)."""
    data = ",".join(str(int(p)) for p in parts).encode()
    return zlib.crc32(data) & 0x7FFFFFFF


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """The seed of one client's local training in one round (batch order, dropout)."""
    return derive_seed(seed, rnd, client_id)


def rng(*parts: int) -> np.random.Generator:
    """A numpy generator on the stream `derive_seed(*parts)`."""
    return np.random.default_rng(derive_seed(*parts))
