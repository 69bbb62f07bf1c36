"""One-off downloads (shared seeds) through the communication ledger: charged once per client, the first time
the client is sampled, whether or not it completes that round (docs/algorithms.md, Communication accounting)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load, save

from raysim.aggregators.base import ClientPlan
from raysim.base_log import BaseDeltaLog
from raysim.ledger import CommLedger
from raysim.lora.factors import BaseDelta

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
    tensors, meta = ledger.state_dict()
    assert set(tensors) == {"last_sync", "received/seed"}                    # arrays, not JSON per client
    restored = CommLedger(3, SHAPES, head_numel=0)
    restored.load_state_dict(load(save(tensors)), json.loads(json.dumps(meta)))
    assert sample(agg, restored, log, 2, [1, 2]) == {1: RM, 2: RM + 1}


def test_earlier_json_checkpoints_still_load():
    agg, _ = make_aggregator("ffa", ranks=(RANK,) * 3)
    log = BaseDeltaLog()
    old = CommLedger(3, SHAPES, head_numel=0)
    old.load_state_dict({}, {"last_sync": {"0": 0, "1": 2, "2": 0}, "received": {"1": ["seed"]}})
    assert old.last_sync.tolist() == [0, 2, 0] and sample(agg, old, log, 3, [1, 2]) == {1: RM, 2: RM + 1}
    oldest = CommLedger(3, SHAPES, head_numel=0)                             # checkpoints without one-off items
    oldest.load_state_dict({}, {"0": 0, "1": 2, "2": 0})
    assert oldest.last_sync.tolist() == [0, 2, 0] and oldest.received == {}


def reference_downloads(schedule, sizes, shapes, once):
    """Scalars each sampled client downloads, from first principles: a list of what every client holds, and
    for the catch-up a scan over every base version it missed."""
    holds: dict[int, int] = {}
    has_seed: set[int] = set()
    out = []
    for rnd, sampled in schedule:
        for cid in sampled:
            missed: dict[str, int] = {}
            for v, per_module in sizes.items():
                if holds.get(cid, 0) < v < rnd:
                    for name, n in per_module.items():
                        missed[name] = missed.get(name, 0) + n
            catch_up = sum(min(shapes[k][0] * shapes[k][1], n) for k, n in missed.items())
            out.append(catch_up + (once if cid not in has_seed else 0))
        for cid in sampled:
            holds[cid] = max([v for v in sizes if v < rnd], default=0)
            has_seed.add(cid)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_download_bytes_equal_a_scan_over_every_version_on_random_schedules(seed):
    """Random sampling and random base changes (some rounds none, modules of different sizes, factored and
    dense entries): the ledger's O(1) pricing charges what a scan over every missed version gives."""
    rng = np.random.default_rng(seed)
    shapes = {"q": (6, 5), "v": (4, 9), "o": (3, 3)}
    num_clients, rounds = 40, 25
    ledger, log = CommLedger(num_clients, shapes, head_numel=0), BaseDeltaLog()
    plan = ClientPlan(start={}, once={"seed": 3})
    sizes, schedule, got = {}, [], []
    for rnd in range(1, rounds + 1):
        sampled = sorted(rng.choice(num_clients, size=int(rng.integers(1, 8)), replace=False).tolist())
        schedule.append((rnd, sampled))
        got += [ledger.download_numel(cid, plan, log) for cid in sampled]
        ledger.mark_synced(sampled, log.version)
        if rnd == 12:                                                       # through a checkpoint mid-run
            tensors, meta = ledger.state_dict()
            ledger = CommLedger(num_clients, shapes, head_numel=0)
            ledger.load_state_dict(load(save(tensors)), json.loads(json.dumps(meta)))
        if rng.random() < 0.7:
            delta = {name: BaseDelta(rng.standard_normal((m, q)), rng.standard_normal((q, n)))
                     for (name, (m, n)), q in zip(shapes.items(), rng.integers(1, 4, size=3)) if rng.random() < 0.8}
            log.record(rnd, delta)
            sizes[rnd] = {name: d.numel() for name, d in delta.items()}
    assert got == reference_downloads(schedule, sizes, shapes, once=3)
    assert sum(got) > 0
