"""What a training engine receives and returns. Plain data (numpy), no Ray, no torch.

A `ClientJob` is "train this client from these factors"; the engine loads them into its resident
model in place, runs `steps` optimizer steps over the client's examples (batch order and dropout
seeded by (run seed, round, client), so results do not depend on which worker trains the client),
and returns only the trainable tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raysim.lora.factors import Factors


@dataclass
class ClientJob:
    client_id: int
    round: int
    seed: int                                  # derived from (run seed, round, client)
    train_idx: np.ndarray                      # indices into the worker's data arrays
    test_idx: np.ndarray | None                # local test split, evaluated after training if given
    start: Factors                             # initial factors (module -> LoRAFactors)
    head: dict[str, np.ndarray]                # initial classifier head
    train: frozenset[str]                      # which factors train ("a", "b", "c")
    steps: int
    fail: bool = False                         # fault injection: the client drops out
    sleep_s: float = 0.0                       # fault injection: a slow client
    lr_scale: dict[str, float] = field(default_factory=dict)   # factor ("a", "b", "c") -> lr multiplier (1.0)
    descriptor: bool = False                   # also return the client's data descriptor (CE-LoRA)


@dataclass
class ClientResult:
    client_id: int
    factors: Factors                           # end-of-round factors (all of them, float32)
    head: dict[str, np.ndarray]
    num_samples: int
    train_loss: float                          # mean loss over the local steps
    train_time_s: float
    steps: int
    local_accuracy: float | None = None        # on the local test split (personalised evaluation)
    local_loss: float | None = None
    worker: int = -1
    extra: dict[str, float] = field(default_factory=dict)
    descriptor: np.ndarray | None = None       # normalised label histogram, when the job asked for it


@dataclass
class EvalResult:
    loss_sum: float
    correct: int
    count: int

    def __add__(self, other: "EvalResult") -> "EvalResult":
        return EvalResult(self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


class SimulatedClientFailure(RuntimeError):
    """Raised inside a worker by fault injection (faults.drop_rate)."""


def batch_schedule(train_idx: np.ndarray, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """`steps` batches over the client's examples: epochs of seeded permutations, cut into batches.

    The last batch of an epoch may be shorter; a client with fewer examples than the batch size
    trains on all of them each step.
    """
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        perm = rng.permutation(train_idx)
        for start in range(0, len(perm), batch_size):
            batches.append(perm[start:start + batch_size])
            if len(batches) == steps:
                break
    return batches
