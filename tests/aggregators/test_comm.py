"""One-off downloads (shared seeds) through the communication ledger: charged once per client, the first time
the client is sampled, whether or not it completes that round (docs/algorithms.md, Communication accounting)."""

from __future__ import annotations

import json

import numpy as np

from raysim.base_log import BaseDeltaLog
from raysim.ledger import CommLedger

from .helpers import RANK, SHAPES, make_aggregator, make_updates

RM = sum(RANK * m for m, _ in SHAPES.values())             # B only (FFA-LoRA), per client
R2 = RANK * RANK * len(SHAPES)                             # C only (CE-LoRA), per client


def sample(agg, ledger, log, rnd, client_ids):
    """The coordinator's plan phase: plan, price every download, then record them; returns {client: scalars}."""
    plans = {cid: agg.plan(rnd, cid) for cid in client_ids}
    down = {cid: ledger.download_numel(cid, plans[cid], log) for cid in client_ids}
    ledger.mark_synced(client_ids, log.version)
    return down


def test_ffa_charges_the_shared_seed_once_per_client():
    agg, _ = make_aggregator("ffa", ranks=(RANK,) * 3)
    ledger, log = CommLedger(3, SHAPES, head_numel=0), BaseDeltaLog()
    rng = np.random.default_rng(0)
    assert sample(agg, ledger, log, 1, [0, 1]) == {0: RM + 1, 1: RM + 1}
    agg.aggregate(1, make_updates(agg, 1, [0, 1], [0.5, 0.5], rng))
    assert sample(agg, ledger, log, 2, [0, 2]) == {0: RM, 2: RM + 1}        # client 2 is new in round 2


def test_celora_does_not_charge_the_frame_seed_again_after_a_failed_round():
    agg, _ = make_aggregator("celora", ranks=(RANK,) * 3)
    ledger, log = CommLedger(3, SHAPES, head_numel=5), BaseDeltaLog()
    rng = np.random.default_rng(1)
    assert sample(agg, ledger, log, 1, [0, 1]) == {0: R2 + 5 + 1, 1: R2 + 5 + 1}
    agg.aggregate(1, make_updates(agg, 1, [1], [1.0], rng))                 # client 0 failed
    assert sample(agg, ledger, log, 2, [0, 1]) == {0: R2 + 5, 1: R2 + 5}     # it already holds the seed


def test_flora_charges_its_seed_once_besides_the_catch_up():
    agg, _ = make_aggregator("flora", ranks=(RANK,) * 2)
    ledger, log = CommLedger(2, SHAPES, head_numel=0), BaseDeltaLog()
    assert sample(agg, ledger, log, 1, [0]) == {0: 1}
    assert sample(agg, ledger, log, 2, [0, 1]) == {0: 0, 1: 1}


def test_what_clients_hold_survives_a_checkpoint():
    agg, _ = make_aggregator("ffa", ranks=(RANK,) * 3)
    ledger, log = CommLedger(3, SHAPES, head_numel=0), BaseDeltaLog()
    sample(agg, ledger, log, 1, [1])
    restored = CommLedger(3, SHAPES, head_numel=0)
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert sample(agg, restored, log, 2, [1, 2]) == {1: RM, 2: RM + 1}
    old_format = CommLedger(3, SHAPES, head_numel=0)                         # checkpoints without one-off items
    old_format.load_state_dict({"0": 0, "1": 2, "2": 0})
    assert old_format.last_sync == {0: 0, 1: 2, 2: 0} and old_format.received == {}
