"""Per-client rank assignment (raysim.ranks) and the rank checks that run before any training."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from raysim.config import ConfigError
from raysim.data.noise import apply_label_noise, noisy_clients
from raysim.engines.base import EvalResult
from raysim.ranks import (assign_ranks, check_ranks_fit, known_min_dim, ranks_by_validation, rerank_due, scale_for,
                          tier_counts, validation_rows, validation_score)

NOISE = "{fraction_clients: 0.8, flip_prob: 0.5}"


def test_int_list_and_tiers(tiny_config):
    assert set(assign_ranks(tiny_config(**{"lora.rank": 4})).values()) == {4}
    ranks = assign_ranks(tiny_config(**{"lora.rank": "[1, 2, 3, 4, 5, 6, 7, 8]", "aggregator.name": "hetlora"}))
    assert ranks == {c: c + 1 for c in range(8)}
    cfg = tiny_config(**{"lora.rank": "{scheme: tiers, ranks: [2, 8], fractions: [0.75, 0.25]}",
                         "aggregator.name": "hetlora"})
    ranks = assign_ranks(cfg)
    assert Counter(ranks.values()) == {2: 6, 8: 2}
    assert assign_ranks(cfg) == ranks                                     # seeded
    assert tier_counts([0.33, 0.33, 0.34], 10) == [4, 3, 3]              # remainder to the first tier


def test_by_quality_gives_the_high_rank_to_clean_clients(tiny_config):
    cfg = tiny_config(**{"federation.num_clients": 20, "lora.rank": "{scheme: by_quality, ranks: [2, 8], "
                         "high_fraction: 0.1}", "aggregator.name": "replication", "data.label_noise": NOISE})
    noisy = set(noisy_clients(cfg).tolist())
    assert len(noisy) == 16
    ranks = assign_ranks(cfg)
    high = {c for c, r in ranks.items() if r == 8}
    assert len(high) == 2 and not (high & noisy)
    assert Counter(ranks.values()) == {2: 18, 8: 2}
    # more high-rank slots than clean clients: every clean client is high, the rest come from noisy ones
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": cfg.lora.rank.model_copy(
        update={"high_fraction": 0.5})})})
    high = {c for c, r in assign_ranks(cfg).items() if r == 8}
    assert len(high) == 10 and set(range(20)) - noisy <= high


def test_by_quality_without_noise_is_a_seeded_choice(tiny_config):
    kw = {"federation.num_clients": 20, "aggregator.name": "hetlora",
          "lora.rank": "{scheme: by_quality, ranks: [4, 16], high_fraction: 0.25}"}
    a = assign_ranks(tiny_config(**kw))
    assert a == assign_ranks(tiny_config(**kw))
    assert Counter(a.values()) == {4: 15, 16: 5}
    assert a != assign_ranks(tiny_config(seed=1, **kw))


BY_VALIDATION = "{scheme: by_validation, ranks: [2, 8], high_fraction: 0.25, after_round: 2, max_examples: 10}"


def _validation_config(tiny_config, **extra):
    return tiny_config(**{"federation.num_clients": 20, "federation.rounds": 3, "aggregator.name": "replication",
                          "lora.rank": BY_VALIDATION, **extra})


def test_by_validation_starts_everyone_low_and_reranks_after_its_round(tiny_config):
    cfg = _validation_config(tiny_config)
    assert assign_ranks(cfg) == {c: 2 for c in range(20)}
    assert cfg.lora.max_rank() == 8                        # the global adapter is sized for the high rank
    assert [rerank_due(cfg, r) for r in (1, 2, 3)] == [False, True, False]
    assert not rerank_due(tiny_config(), 1)
    with pytest.raises(ConfigError, match="lora.rank.after_round: round 2 never comes"):
        check_ranks_fit(_validation_config(tiny_config, **{"federation.rounds": 1}))
    check_ranks_fit(cfg)
    with pytest.raises(ConfigError, match="lora.rank"):                  # needs a mixed-rank method
        _validation_config(tiny_config, **{"aggregator.name": "ffa"})


def test_ranks_by_validation_moves_the_best_scored_clients_up(tiny_config):
    spec = _validation_config(tiny_config).lora.rank
    scores = {c: float((7 * c) % 20) for c in range(20)}                # a permutation of 0..19
    ranks = ranks_by_validation(spec, scores, 20, seed=0)
    assert {c for c, r in ranks.items() if r == 8} == {c for c in range(20) if scores[c] >= 15}
    assert Counter(ranks.values()) == {2: 15, 8: 5}
    # unscored and non-finite clients come last, even behind negative scores (minus a loss)
    two = spec.model_copy(update={"high_fraction": 0.1})
    few = {3: -2.0, 11: -5.0, 7: float("nan")}
    for seed in range(5):
        assert {c for c, r in ranks_by_validation(two, few, 20, seed).items() if r == 8} == {3, 11}


def test_ranks_by_validation_breaks_ties_by_a_seeded_order(tiny_config):
    spec = _validation_config(tiny_config).lora.rank
    tied = {c: 0.5 for c in range(20)}
    a = ranks_by_validation(spec, tied, 20, seed=0)
    assert a == ranks_by_validation(spec, tied, 20, seed=0) and Counter(a.values()) == {2: 15, 8: 5}
    assert any(ranks_by_validation(spec, tied, 20, seed=s) != a for s in (1, 2, 3))


def test_validation_rows_are_a_seeded_subset_of_the_training_rows(tiny_config):
    spec = _validation_config(tiny_config).lora.rank
    train = [np.arange(100 * c, 100 * c + 4 + 3 * c) for c in range(5)]   # 4, 7, 10, 13, 16 rows
    rows = validation_rows(spec, train, seed=0)
    assert [len(rows[c]) for c in range(5)] == [4, 7, 10, 10, 10]       # at most max_examples = 10
    for c in range(5):
        assert set(rows[c]) <= set(train[c]) and list(rows[c]) == sorted(set(rows[c]))
    again, other = validation_rows(spec, train, seed=0), validation_rows(spec, train, seed=1)
    assert all(np.array_equal(rows[c], again[c]) for c in range(5))
    assert any(not np.array_equal(rows[c], other[c]) for c in (3, 4))


def test_validation_score_is_accuracy_else_minus_the_loss():
    assert validation_score(EvalResult.classification(loss_sum=6.0, correct=3, count=4)) == 0.75
    assert validation_score(EvalResult({"loss_sum": 6.0, "count": 4})) == -1.5                  # regression
    assert validation_score(EvalResult({"nll_sum": 9.0, "tokens": 3, "count": 2})) == -3.0      # causal LM
    assert np.isnan(validation_score(EvalResult.zero()))


def test_by_validation_finds_the_clean_clients_under_label_noise(tiny_config):
    """A model that predicts the true labels, scored on the labels each client holds: the clean clients
    score 1, the noisy ones about 1 - flip_prob, so the high rank goes to clean clients without reading
    which clients are noisy."""
    cfg = _validation_config(tiny_config, **{"data.label_noise": "{fraction_clients: 0.75, flip_prob: 0.5}"})
    true = np.random.default_rng(5).integers(0, 4, size=20 * 40)
    train = [np.arange(40 * c, 40 * c + 40) for c in range(20)]
    held, noisy = apply_label_noise(true, train, cfg, num_labels=4)
    scores = {}
    for cid, rows in validation_rows(cfg.lora.rank, train, cfg.seed).items():
        correct = int(np.sum(held[rows] == true[rows]))
        scores[cid] = validation_score(EvalResult.classification(0.0, correct, len(rows)))
    ranks = ranks_by_validation(cfg.lora.rank, scores, 20, cfg.seed)
    high = {c for c, r in ranks.items() if r == 8}
    assert len(noisy) == 15 and high == set(range(20)) - set(noisy.tolist())


def test_by_data_size_gives_the_largest_clients_the_highest_rank(tiny_config):
    cfg = tiny_config(**{"lora.rank": "{scheme: by_data_size, ranks: [2, 8, 4], fractions: [0.5, 0.25, 0.25]}",
                         "aggregator.name": "hetlora"})
    sizes = [5, 50, 7, 30, 9, 40, 11, 3]
    ranks = assign_ranks(cfg, sizes)
    order = np.argsort(sizes)[::-1]
    assert [ranks[int(c)] for c in order] == [8, 8, 4, 4, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="by_data_size"):
        assign_ranks(cfg)


@pytest.mark.parametrize("rank, match", [
    ("{scheme: tiers, ranks: [4, 16], fractions: [0.5, 0.6]}", "sum to 1"),
    ("{scheme: by_data_size, ranks: [4, 16], fractions: [0.9]}", "equal length"),
    ("{scheme: tiers, ranks: [0, 16], fractions: [0.5, 0.5]}", ">= 1"),
    ("0", ">= 1"),
    ("[4, 0, 4, 4, 4, 4, 4, 4]", ">= 1"),
    ("{scheme: by_quality, ranks: [16, 4]}", "low <= high"),
    ("{scheme: by_quality, ranks: [4]}", "low <= high"),
    ("{scheme: by_validation, ranks: [16, 4]}", "low <= high"),
    ("{scheme: by_validation, ranks: [4, 16], high_fraction: 1.5}", "high_fraction"),
    ("{scheme: by_validation, ranks: [4, 16], after_round: 0}", "after_round"),
    ("{scheme: nope, ranks: [4]}", "tiers, by_quality, by_data_size, by_validation"),
])
def test_bad_rank_specs_are_config_errors_naming_the_key(tiny_config, rank, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny_config(**{"lora.rank": rank, "aggregator.name": "hetlora"})
    assert "lora.rank" in str(err.value)


def test_methods_without_mixed_rank_support_refuse_tiers(tiny_config):
    with pytest.raises(ConfigError, match="lora.rank.*hetlora.*replication"):
        tiny_config(**{"lora.rank": "{scheme: tiers, ranks: [2, 8], fractions: [0.5, 0.5]}",
                       "aggregator.name": "ffa"})


def test_rank_above_min_dim_is_refused_before_training(tiny_config):
    from raysim.runner import prepare_data

    assert known_min_dim("random:bert-tiny") == 128 and known_min_dim("embedded:minilm-l6") == 384
    cfg = tiny_config(**{"lora.rank": "{scheme: tiers, ranks: [4, 129], fractions: [0.5, 0.5]}",
                         "aggregator.name": "hetlora"})
    with pytest.raises(ConfigError, match=r"lora.rank: rank 129 exceeds min\(m, n\) = 128"):
        prepare_data(cfg)
    check_ranks_fit(tiny_config(**{"lora.rank": 128}))                   # the bound itself is fine
    with pytest.raises(ConfigError, match="module q is 7×5"):
        check_ranks_fit(tiny_config(**{"lora.rank": 6}), {"q": (7, 5), "v": (6, 6)})


def test_mixed_rank_scale_shared_by_default_or_per_rank(tiny_config):
    over = {"lora.rank": "{scheme: tiers, ranks: [2, 8], fractions: [0.5, 0.5]}", "aggregator.name": "hetlora",
            "lora.alpha": 16}
    default = scale_for(tiny_config(**over))
    shared = scale_for(tiny_config(**over, **{"lora.mixed_rank_scale": "shared"}))
    per_rank = scale_for(tiny_config(**over, **{"lora.mixed_rank_scale": "per_rank"}))
    assert [default(r) for r in (2, 8)] == [shared(r) for r in (2, 8)] == [2.0, 2.0]     # alpha / r_max
    assert [per_rank(r) for r in (2, 8)] == [8.0, 2.0]                                   # alpha / r_k
    single = {"lora.rank": 4, "lora.alpha": 16}
    assert (scale_for(tiny_config(**single, **{"lora.mixed_rank_scale": "shared"}))(4)
            == scale_for(tiny_config(**single, **{"lora.mixed_rank_scale": "per_rank"}))(4) == 4.0)
    with pytest.raises(ConfigError, match="lora.mixed_rank_scale"):
        tiny_config(**over, **{"lora.mixed_rank_scale": "sqrt"})
