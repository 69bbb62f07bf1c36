"""What a training engine receives and returns. Plain data (numpy), no Ray, no torch.

A `ClientJob` is "train this client from these factors"; the engine loads them into its resident
model in place, runs `steps` optimizer steps over the client's examples (batch order and dropout
seeded by (run seed, round, client), so results do not depend on which worker trains the client),
and returns only the trainable tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from raysim.lora.factors import Factors


@dataclass(frozen=True)
class EngineSettings:
    """Everything an engine needs to know about local training and evaluation, built once from the config."""

    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    max_grad_norm: float | None
    train_head: bool
    eval_batch_size: int
    bf16: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "EngineSettings":
        t = cfg.train
        return cls(optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, batch_size=t.batch_size,
                   max_grad_norm=t.max_grad_norm, train_head=cfg.lora.train_head,
                   eval_batch_size=cfg.eval.batch_size, bf16=cfg.model.dtype == "bfloat16")


@dataclass(frozen=True)
class ClientFault:
    """Injected faults of one client in one round (see raysim.faults); applied by the worker, never by an engine."""

    drop: bool = False           # the client drops out: it reports a failure instead of an update
    delay_s: float = 0.0         # a slow client: its task sleeps this long before training
    corrupt: str | None = None   # nan | inf | huge | shape: its upload is broken after training


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
    lr_scale: dict[str, float] = field(default_factory=dict)   # factor ("a", "b", "c") -> lr multiplier (1.0)
    fault: ClientFault = ClientFault()         # injected faults (tests and robustness studies)
    client_hook: Callable | None = None        # the aggregator's client-side computation, if it asked for one
    deadline: float | None = None              # time.time() of the round's deadline: a job not started by then
                                               # is skipped (a straggler) instead of keeping the worker busy


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
    hook_output: np.ndarray | None = None      # what the job's client_hook returned (e.g. CE-LoRA's label histogram)


@dataclass
class EvalResult:
    """Sums over evaluated examples, added across batches and shards; `metrics()` turns them into rates.

    Classification: loss_sum, correct, count. Causal LM: nll_sum and tokens (response tokens), count, and
    for generation exact and generated.
    """

    sums: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)   # per-example predictions, for macro_f1 etc.

    @staticmethod
    def zero() -> "EvalResult":
        return EvalResult({})

    @staticmethod
    def classification(loss_sum: float, correct: int, count: int) -> "EvalResult":
        return EvalResult({"loss_sum": loss_sum, "correct": correct, "count": count})

    def __add__(self, other: "EvalResult") -> "EvalResult":
        keys = set(self.sums) | set(other.sums)
        arrays = {k: np.concatenate([x for x in (self.arrays.get(k), other.arrays.get(k)) if x is not None])
                  for k in set(self.arrays) | set(other.arrays)}
        return EvalResult({k: self.sums.get(k, 0) + other.sums.get(k, 0) for k in keys}, arrays)

    @staticmethod
    def total(parts: list["EvalResult"]) -> "EvalResult":
        """The sum of evaluation shards."""
        out = EvalResult.zero()
        for part in parts:
            out = out + part
        return out

    def _rate(self, num: str, den: str) -> float | None:
        return self.sums[num] / self.sums[den] if num in self.sums and self.sums.get(den) else None

    @property
    def accuracy(self) -> float | None:
        return self._rate("correct", "count")

    @property
    def loss(self) -> float | None:
        """Mean loss per example (classification, regression) or per response token (causal LM)."""
        return self._rate("nll_sum", "tokens") if "nll_sum" in self.sums else self._rate("loss_sum", "count")

    def by_group(self) -> dict[int, "EvalResult"]:
        """The per-group sums (eval.group_by), keyed by group code."""
        out: dict[int, dict[str, float]] = {}
        for key, value in self.sums.items():
            if key.startswith("group/"):
                _, code, name = key.split("/", 2)
                out.setdefault(int(code), {})[name] = value
        return {code: EvalResult(sums) for code, sums in sorted(out.items())}

    def metrics(self) -> dict[str, float | None]:
        """accuracy, loss, perplexity = exp(token loss), exact_match; None where the task has no such metric."""
        from raysim.tasks.metrics import from_predictions

        loss = self.loss
        perplexity = math.exp(min(loss, 700.0)) if loss is not None and "nll_sum" in self.sums else None
        out = {"accuracy": self.accuracy, "loss": loss, "perplexity": perplexity,
               "exact_match": self._rate("exact", "generated"), "macro_f1": None, "mcc": None,
               "pearson": None, "spearman": None}
        out.update(from_predictions(self.arrays))
        return out


@dataclass
class ClientFailure:
    """A client job that did not produce an update (the other jobs of the same task may have).

    simulated: injected by faults.drop_rate, never retried; retryable: worth another try on another worker
    (e.g. out of GPU memory even alone); status: `failed`, or `straggler` for a job skipped at the deadline.
    """

    client_id: int
    error: str
    simulated: bool = False
    retryable: bool = False
    status: str = "failed"


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
