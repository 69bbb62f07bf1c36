"""Per-client rank assignment (raysim.ranks) and the rank checks that run before any training."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from raysim.config import ConfigError
from raysim.data.noise import noisy_clients
from raysim.ranks import assign_ranks, check_ranks_fit, known_min_dim, scale_for, tier_counts

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
    ("{scheme: nope, ranks: [4]}", "tiers, by_quality, by_data_size"),
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
