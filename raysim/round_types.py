"""What one round hands from phase to phase and to the driver: the coordinator's plan and aggregate phases'
outcomes (`RoundPlan`, `Aggregated`), the results still being computed when it returns (`Pending`) and the
finished round (`RoundOutput`) that the driver's `Recorder` completes and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysim.aggregators.base import AggregateResult, ClientPlan, ClientUpdate
from raysim.lora.factors import Factors


@dataclass
class Pending:
    """Results of round r still being computed when `run_round` returns (ObjectRefs)."""

    evaluation: list = field(default_factory=list)      # EvalResult shards of the global evaluation
    deviation: Any = None                               # (deviation_rel, deviation_rel_round, module rows)
    personal: list = field(default_factory=list)        # [(client id, EvalResult)] shards, personalised evaluation
    personal_weights: dict[int, float] = field(default_factory=dict)   # p_k of the personally evaluated clients


@dataclass
class RoundOutput:
    row: dict[str, Any]                                     # one rounds.parquet row (pending values missing)
    clients: list[dict[str, Any]]                           # clients.parquet rows
    pending: Pending = field(default_factory=Pending)
    group_names: list[str] = field(default_factory=list)    # eval.group_by: the values of the group codes
    uploads: dict[int, tuple[dict[str, np.ndarray], dict[str, str]]] = field(default_factory=dict)
    global_tensors: dict[str, np.ndarray] | None = None     # save_updates only
    checkpoint: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None


@dataclass
class RoundPlan:
    """The plan phase's outcome: each sampled client's plan and the scalars sent to them."""

    clients: dict[int, ClientPlan]
    download_numel: int


@dataclass
class Aggregated:
    """The aggregate phase's outcome."""

    updates: list[ClientUpdate]
    result: AggregateResult
    old_global: Factors
