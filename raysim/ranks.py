"""Per-client LoRA ranks from `lora.rank` (an int, a per-client list, or a heterogeneity spec), the
re-ranking of `by_validation` from measured scores, the scale each rank uses, and the check that no rank
exceeds what the target modules can hold."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from raysim.config import ConfigError, ExperimentConfig, RankByDataSize, RankByQuality, RankByValidation, RankTiers
from raysim.models import target_modules
from raysim.seeds import RANK_QUALITY, RANK_TIERS, derive_seed


def tier_counts(fractions: list[float], n: int) -> list[int]:
    """Exact counts round(fraction·N) per tier, the remainder (±) going to the first tier."""
    counts = [int(round(f * n)) for f in fractions]
    counts[0] += n - sum(counts)
    return counts


def assign_ranks(cfg: ExperimentConfig, num_samples: list[int] | np.ndarray | None = None) -> dict[int, int]:
    """client id -> rank.

    - int: every client; list: rank of client k is list[k].
    - tiers: counts `tier_counts(fractions, N)`, given in tier order to a seeded random permutation.
    - by_data_size: same counts; clients sorted by training-set size (largest first, ties by id) get
      the ranks from the highest down. Needs `num_samples` (client k's training-set size).
    - by_quality {ranks: [low, high], high_fraction}: round(high_fraction·N) clients get `high`, the
      rest `low`. With `data.label_noise` the clean clients (the high-quality ones, see
      raysim.data.noise.noisy_clients) are chosen first, in seeded random order, and noisy clients
      only when there are fewer clean clients than high-rank slots. Without label noise there is no
      quality signal: the high-rank clients are a seeded random choice.
    - by_validation {ranks: [low, high], ...}: everyone starts at `low`; the coordinator re-ranks the
      clients with `ranks_by_validation` after round `after_round` (see `rerank_due`).
    """
    n = cfg.federation.num_clients
    spec = cfg.lora.rank
    if isinstance(spec, int):
        return {c: spec for c in range(n)}
    if isinstance(spec, list):
        return {c: int(r) for c, r in enumerate(spec)}
    if isinstance(spec, RankByQuality):
        return _by_quality(cfg, spec)
    if isinstance(spec, RankByValidation):
        return {c: spec.ranks[0] for c in range(n)}
    if isinstance(spec, RankByDataSize):
        if num_samples is None or len(num_samples) != n:
            raise ValueError("lora.rank {scheme: by_data_size} needs the training-set size of every client")
        order = sorted(range(n), key=lambda c: (-int(num_samples[c]), c))
        tiers = sorted(zip(spec.ranks, tier_counts(spec.fractions, n)), key=lambda t: -t[0])
        return _fill(order, tiers)
    assert isinstance(spec, RankTiers)
    order = np.random.default_rng(derive_seed(cfg.seed, RANK_TIERS)).permutation(n)
    return _fill(order, list(zip(spec.ranks, tier_counts(spec.fractions, n))))


def _fill(order, tiers: list[tuple[int, int]]) -> dict[int, int]:
    ranks, pos = {}, 0
    for rank, count in tiers:
        for c in order[pos:pos + count]:
            ranks[int(c)] = int(rank)
        pos += count
    return ranks


def _by_quality(cfg: ExperimentConfig, spec: RankByQuality) -> dict[int, int]:
    from raysim.data.noise import noisy_clients

    n = cfg.federation.num_clients
    low, high = spec.ranks
    n_high = int(round(spec.high_fraction * n))
    rng = np.random.default_rng(derive_seed(cfg.seed, RANK_QUALITY))
    noisy = set(noisy_clients(cfg).tolist())
    clean = [c for c in range(n) if c not in noisy]
    dirty = sorted(noisy)
    order = [int(c) for c in rng.permutation(clean)] + [int(c) for c in rng.permutation(dirty)]
    return _fill(order, [(high, n_high), (low, n - n_high)])


# ----------------------------------------------------------------------------- by_validation


def rerank_due(cfg: ExperimentConfig, rnd: int) -> bool:
    """True after the round in which `lora.rank: {scheme: by_validation}` scores and re-ranks the clients."""
    spec = cfg.lora.rank
    return isinstance(spec, RankByValidation) and rnd == spec.after_round


def validation_rows(spec: RankByValidation, client_train: Sequence[np.ndarray], seed: int) -> dict[int, np.ndarray]:
    """client id -> the rows it is scored on: a seeded subset of at most `max_examples` of its training rows
    (sorted; all of them when it has fewer). Training rows, because label noise (data.label_noise) touches
    only those: a client validates on its own labelled data, which carries its own noise, while the local
    test splits keep the true labels and would make every client look equally good."""
    out = {}
    for cid, rows in enumerate(client_train):
        rows = np.asarray(rows)
        if len(rows) > spec.max_examples:
            pick = np.random.default_rng(derive_seed(seed, RANK_QUALITY, cid)).choice(
                len(rows), spec.max_examples, replace=False)
            rows = rows[np.sort(pick)]
        out[cid] = rows
    return out


def validation_score(result) -> float:
    """Higher is better: an evaluation's accuracy, else minus its loss (regression, causal LM), else NaN."""
    if result.accuracy is not None:
        return float(result.accuracy)
    if result.loss is not None:
        return -float(result.loss)
    return math.nan


def ranks_by_validation(spec: RankByValidation, scores: Mapping[int, float], n: int, seed: int) -> dict[int, int]:
    """client id -> rank: the round(high_fraction·n) clients with the highest scores get `high`, the rest
    `low`. Ties are broken by a seeded random order; a client without a finite score ranks below every
    scored one."""
    low, high = spec.ranks
    n_high = int(round(spec.high_fraction * n))
    tiebreak = np.random.default_rng(derive_seed(seed, RANK_QUALITY)).permutation(n)

    def key(c: int) -> tuple[int, float, int]:
        s = scores.get(c)
        scored = s is not None and math.isfinite(s)
        return (0, -float(s), int(tiebreak[c])) if scored else (1, 0.0, int(tiebreak[c]))

    return _fill(sorted(range(n), key=key), [(high, n_high), (low, n - n_high)])


def scale_for(cfg: ExperimentConfig):
    """s(r), the LoRA scale of a client of rank r (docs/algorithms.md, "Mixed ranks").

    One rank for everyone: PEFT's alpha / r. Mixed ranks, `lora.mixed_rank_scale`:
    - `shared` (default): alpha / r_max for every client, so the slot-wise averages of the padding methods
      combine columns trained at one scale, and alpha keeps the meaning it has in an r_max run;
    - `per_rank`: alpha / r_k, what PEFT gives each client on its own (low-rank clients get larger scales).
    """
    alpha = cfg.lora.alpha
    if isinstance(cfg.lora.rank, int):
        return lambda r: alpha / r
    if cfg.lora.mixed_rank_scale == "per_rank":
        return lambda r: alpha / r
    r_max = cfg.lora.max_rank()
    return lambda r: alpha / r_max


# ----------------------------------------------------------------------------- rank ≤ min(m, n)


def known_min_dim(model_name: str) -> int | None:
    """An upper bound of min(m, n) of the adapted Linear layers, without loading weights: the hidden size.

    Every Linear of a BERT encoder has the hidden size as its smaller side; in decoders with grouped-query
    attention the key/value projections are smaller still, which the coordinator's check on the real shapes
    catches before round 1. random:* models read their table, the embedded MiniLM and local HF directories
    their config.json (hidden_size, d_model or n_embd). None when unknown.
    """
    from raysim.models import hidden_size, model_path

    if model_name.startswith("random:"):
        return hidden_size(model_name)
    try:
        path = Path(model_path(model_name)) / "config.json"
        conf = json.loads(path.read_text())
    except (OSError, ValueError, ImportError):
        return None
    dims = [conf[k] for k in ("hidden_size", "d_model", "n_embd") if isinstance(conf.get(k), int)]
    return int(dims[0]) if dims else None


def check_ranks_fit(cfg: ExperimentConfig, module_shapes: dict[str, tuple[int, int]] | None = None) -> None:
    """ConfigError naming `lora.rank` if the largest rank exceeds min(m, n) of a target module, or if a
    by_validation re-ranking round is later than the last round.

    module_shapes (module -> (m, n)) are the real shapes (the coordinator has them before round 1);
    without them the bound comes from the model's config (`known_min_dim`), and nothing is checked
    when that is unknown.
    """
    spec = cfg.lora.rank
    if isinstance(spec, RankByValidation) and spec.after_round > cfg.federation.rounds:
        raise ConfigError(f"lora.rank.after_round: round {spec.after_round} never comes (federation.rounds "
                          f"is {cfg.federation.rounds})")
    r_max = cfg.lora.max_rank()
    if module_shapes:
        name, (m, n) = min(module_shapes.items(), key=lambda kv: min(kv[1]))
        bound, where = min(m, n), f"module {name} is {m}×{n}"
    else:
        bound = known_min_dim(cfg.model.name)
        if bound is None:
            return
        where = f"the hidden size of {cfg.model.name} is {bound}"
    if r_max > bound:
        raise ConfigError(f"lora.rank: rank {r_max} exceeds min(m, n) = {bound} of the target modules "
                          f"{target_modules(cfg)} ({where}); use ranks <= {bound}")
