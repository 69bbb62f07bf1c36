"""Checkpoints of the declared server state (`global_state`, `client_state`) through the base class."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from safetensors.numpy import load, save

from raysim.aggregators import REGISTRY
from raysim.aggregators.base import AggregateResult, Aggregator
from raysim.client_store import ClientStore
from raysim.lora.factors import LoRAFactors

from .helpers import make_aggregator, make_updates, random_weights

CASES = [(name, {}) for name in sorted(REGISTRY)] + [
    ("hetlora", {"prune": True, "prune_tol": 0.9, "weights": "sparsity"}),   # client ranks change
    ("flexlora", {"split": "us_v"}),
]


def assert_identical(x, y, path: str) -> None:
    """Same types, same dict key order, arrays equal bit for bit with the same dtype."""
    assert type(x) is type(y), path
    if isinstance(x, LoRAFactors):
        assert x.scale == y.scale, path
        for part in ("a", "b", "c"):
            assert_identical(getattr(x, part), getattr(y, part), f"{path}.{part}")
    elif isinstance(x, np.ndarray):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path
    elif isinstance(x, dict):
        assert list(x) == list(y), path
        for k in x:
            assert_identical(x[k], y[k], f"{path}/{k}")
    elif isinstance(x, (tuple, list)):
        assert len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y)):
            assert_identical(a, b, f"{path}/{i}")
    else:
        np.testing.assert_equal(x, y, err_msg=path)


def assert_same_result(r1: AggregateResult, r2: AggregateResult) -> None:
    assert (r1.base_delta is None) == (r2.base_delta is None)
    for name, d in (r1.base_delta or {}).items():
        assert_identical(d.u, r2.base_delta[name].u, f"base_delta/{name}/u")
        assert_identical(d.v, r2.base_delta[name].v, f"base_delta/{name}/v")
    np.testing.assert_equal(r1.deviation_rel, r2.deviation_rel)
    np.testing.assert_equal(r1.stats, r2.stats)


def declared(agg: Aggregator) -> tuple[str, ...]:
    return agg.global_state + agg.client_state


def through_json(agg: Aggregator) -> tuple[dict[str, np.ndarray], dict]:
    """state_dict() as a checkpoint stores it: arrays through safetensors, metadata through JSON."""
    tensors, meta = agg.state_dict()
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in tensors.items())
    return load(save(tensors)), json.loads(json.dumps(meta))


@pytest.mark.parametrize(("name", "params"), CASES)
def test_declared_state_round_trips_bit_for_bit_and_aggregates_alike(name, params):
    ranks = (2, 4, 3) if REGISTRY[name].mixed_ranks else (2, 2, 2)
    agg1, _ = make_aggregator(name, params, ranks=ranks)
    rng = np.random.default_rng(11)
    for rnd, cids in ((1, [0, 1]), (2, [1, 2])):
        agg1.aggregate(rnd, make_updates(agg1, rnd, cids, random_weights(2, rng), rng))

    tensors, meta = through_json(agg1)
    assert {key.split("/", 1)[0] for key in tensors} <= set(declared(agg1))     # named after the attribute
    agg2, _ = make_aggregator(name, params, ranks=ranks)
    agg2.load_state_dict(tensors, meta)
    for attr in declared(agg1):
        assert_identical(getattr(agg1, attr), getattr(agg2, attr), attr)

    updates = make_updates(agg1, 3, [0, 2], random_weights(2, rng), rng)
    assert_same_result(agg1.aggregate(3, copy.deepcopy(updates)), agg2.aggregate(3, copy.deepcopy(updates)))
    for attr in declared(agg1):
        assert_identical(getattr(agg1, attr), getattr(agg2, attr), attr)


def test_client_state_is_keyed_by_client_id_and_survives_json():
    agg, _ = make_aggregator("fedsa")
    rng = np.random.default_rng(12)
    agg.aggregate(1, make_updates(agg, 1, [0, 2], random_weights(2, rng), rng))
    tensors, meta = through_json(agg)
    assert {key for key in tensors if key.startswith("client_b/")} == {
        f"client_b/{cid}/{mod}" for cid in (0, 2) for mod in agg.global_factors}
    restored, _ = make_aggregator("fedsa")
    restored.load_state_dict(tensors, meta)
    assert list(restored.client_b) == [0, 2]                      # int keys, not the strings JSON would make


class Counting(Aggregator):
    """Test aggregator holding state of every plain kind, declared and never serialised by hand."""

    global_state = Aggregator.global_state + ("count", "history", "last")
    client_state = ("seen",)

    def reset_state(self) -> None:
        super().reset_state()
        self.count, self.history, self.last = 0, [], None

    def aggregate(self, rnd, updates):
        self.count += 1
        self.history.append(float(rnd) / 3)
        self.last = (rnd, "done")
        for u in updates:
            self.seen[u.client_id] = u.num_samples
        return AggregateResult()


def test_third_party_state_of_plain_values_round_trips():
    agg, init = make_aggregator("fedit")
    custom = Counting()
    custom.setup(init, agg.client_ranks, agg.scale_of_rank, 0)
    rng = np.random.default_rng(13)
    for rnd in (1, 2):
        custom.aggregate(rnd, make_updates(custom, rnd, [rnd, 0], random_weights(2, rng), rng))
    restored = Counting()
    restored.load_state_dict(*through_json(custom))
    for attr in declared(custom):
        assert_identical(getattr(custom, attr), getattr(restored, attr), attr)
    assert restored.seen == {1: 10, 0: 10, 2: 10} and restored.last == (2, "done")


def test_unsupported_state_is_refused_by_name():
    custom = Counting()
    custom.history = [object()]
    with pytest.raises(TypeError, match="history/0"):
        custom.state_dict()
    custom.reset_state()
    custom.seen = [1, 2]
    with pytest.raises(TypeError, match="Counting.seen is per-client state"):
        custom.state_dict()


STATEFUL = [("fedsa", {}), ("celora", {}), ("hetlora", {"prune": True, "prune_tol": 0.9, "weights": "sparsity"})]


def with_store(name, params, ranks, path):
    """The aggregator with its per-client state in a client store on `path`, two clients cached."""
    agg, init = make_aggregator(name, params, ranks=ranks)
    agg.use_client_store(ClientStore(path, "client_state/aggregator", cache_clients=2))
    agg.setup(init, dict(enumerate(ranks)), agg.scale_of_rank, 0)
    return agg


@pytest.mark.parametrize(("name", "params"), STATEFUL)
def test_state_in_a_client_store_equals_state_in_memory_through_a_resume(tmp_path, name, params):
    """Rounds with the per-client state on disk (a cache of two clients, so most reads come from the files)
    give the results of the in-memory dicts, and resuming from a store checkpoint continues identically."""
    ranks = (2, 4, 3, 4, 2) if REGISTRY[name].mixed_ranks else (2,) * 5
    memory, _ = make_aggregator(name, params, ranks=ranks)
    stored = with_store(name, params, ranks, tmp_path)
    rng = np.random.default_rng(21)
    schedule = [(1, [0, 1, 2]), (2, [3, 1, 4]), (3, [0, 4, 2]), (4, [1, 2, 3])]
    played, starts, checkpoint = {}, {}, None
    for rnd, cids in schedule:
        updates = played[rnd] = make_updates(memory, rnd, cids, random_weights(3, rng), rng)
        starts[rnd] = {cid: memory.plan(rnd, cid).start for cid in cids}
        for cid in cids:                                    # both plan every client alike
            assert_identical(starts[rnd][cid], stored.plan(rnd, cid).start, f"{rnd}/{cid}")
        assert_same_result(memory.aggregate(rnd, copy.deepcopy(updates)), stored.aggregate(rnd, copy.deepcopy(updates)))
        if rnd == 2:
            tensors, meta = stored.state_dict()
            checkpoint = (load(save(tensors)), json.loads(json.dumps(meta)))
    for attr in memory.client_state:
        assert_identical(getattr(memory, attr), dict(getattr(stored, attr)), attr)

    resumed = with_store(name, params, ranks, tmp_path)
    resumed.load_state_dict(*checkpoint)
    for rnd, cids in schedule[2:]:
        for cid in cids:
            assert_identical(resumed.plan(rnd, cid).start, starts[rnd][cid], f"{rnd}/{cid}")
        resumed.aggregate(rnd, copy.deepcopy(played[rnd]))
    for attr in memory.client_state:
        assert_identical(getattr(memory, attr), dict(getattr(resumed, attr)), attr)
    for attr in memory.global_state:
        assert_identical(getattr(memory, attr), getattr(resumed, attr), attr)


def test_an_inline_checkpoint_loads_into_a_store_and_a_store_checkpoint_needs_one(tmp_path):
    agg, _ = make_aggregator("fedsa")
    rng = np.random.default_rng(22)
    agg.aggregate(1, make_updates(agg, 1, [0, 2], random_weights(2, rng), rng))
    stored = with_store("fedsa", {}, (2, 2, 2), tmp_path)
    stored.load_state_dict(*through_json(agg))
    assert_identical(agg.client_b, dict(stored.client_b), "client_b")
    plain, _ = make_aggregator("fedsa")
    with pytest.raises(ValueError, match="use_client_store"):
        plain.load_state_dict(*through_json(stored))
