"""Aggregators, one module each, registered by name (see base.py for the contract)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raysim.aggregators import (celora, fedex, fedit, fedsa, ffa, flexlora, flora, hetlora,  # noqa: F401
                               lora_fair, replication, rolora)  # (registration side effects)
from raysim.aggregators.base import REGISTRY, Aggregator, aggregator_class, build_aggregator, register

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig

__all__ = ["REGISTRY", "Aggregator", "aggregator_class", "build_aggregator", "register", "resolve_aggregator"]


def resolve_aggregator(name: str, params: dict[str, Any], cfg: "ExperimentConfig | None" = None) -> Aggregator:
    """Build the aggregator and check it fits the config; raises ConfigError naming the key."""
    from raysim.errors import ConfigError

    agg = build_aggregator(name, params)
    if cfg is not None and not isinstance(cfg.lora.rank, int) and not agg.mixed_ranks:
        mixed = sorted(n for n, c in REGISTRY.items() if c.mixed_ranks)
        raise ConfigError(f"lora.rank: aggregator {name!r} needs one rank for all clients; "
                          f"for heterogeneous ranks use one of: {', '.join(mixed) or '(none registered)'}")
    return agg
