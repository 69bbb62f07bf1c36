"""The client-state store (raysim/client_store.py): records on the run's storage behind a small LRU cache,
copy-on-write segments, incremental checkpoints, and pruning of the files no kept checkpoint lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load

from raysim.checkpoint import drop_orphan_segments, load_newest_intact, save_checkpoint
from raysim.client_store import ClientStore, data_file, decode_record, encode_record, index_file
from raysim.client_store import segment_files as stored_segments
from raysim.heads import HeadState
from raysim.lora.factors import LoRAFactors
from raysim.storage import RunStorage

ROOT = "client_state/test"


def record_of(cid: int, version: int = 0) -> dict:
    """A record of every kind of value a method keeps per client, different per client and version."""
    rng = np.random.default_rng([cid, version])
    return {"b": {"layer.q": rng.standard_normal((4, 2)).astype(np.float32),
                  "layer.v": rng.standard_normal((3, 2))},
            "ab": {"layer.q": (rng.standard_normal((2, 5)), rng.integers(0, 9, size=(4, 2)))},
            "factors": LoRAFactors(a=rng.standard_normal((2, 3)), b=rng.standard_normal((3, 2)), scale=0.3 + cid),
            "rank": int(cid % 5) + version, "note": [None, True, 1.5, "x"]}


def assert_same(x, y) -> None:
    assert type(x) is type(y)
    if isinstance(x, LoRAFactors):
        assert x.scale == y.scale and all(x_.tobytes() == y_.tobytes() for x_, y_ in ((x.a, y.a), (x.b, y.b)))
    elif isinstance(x, np.ndarray):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    elif isinstance(x, dict):
        assert list(x) == list(y)
        for k in x:
            assert_same(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for a, b in zip(x, y):
            assert_same(a, b)
    else:
        assert x == y


def fill(store: ClientStore, cids, version: int = 0) -> None:
    for cid in cids:
        for attr, value in record_of(cid, version).items():
            store.put(attr, cid, value)


def check(store: ClientStore, expected: dict[int, int]) -> None:
    """Every client in `expected` holds the record of its version, read through the store."""
    for cid, version in expected.items():
        for attr, value in record_of(cid, version).items():
            assert_same(store.get(attr, cid), value)


def segment_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / ROOT).glob("seg-*"))


def test_a_record_round_trips_bit_for_bit():
    rec = record_of(3)
    assert_same(decode_record(encode_record(rec)), rec)


def test_the_store_round_trips_through_eviction_and_a_checkpoint(tmp_path):
    store = ClientStore(tmp_path, ROOT, cache_clients=8)
    fill(store, range(50))
    assert len(store._cache) <= 8                                  # the rest was written out and dropped
    check(store, dict.fromkeys(range(50), 0))                      # read back from the segments
    assert store.get("b", 999) is None and 999 not in store.view("b")
    meta = json.loads(json.dumps(store.state_dict()))
    again = ClientStore(tmp_path, ROOT, cache_clients=8)
    again.load_state_dict(meta)
    check(again, dict.fromkeys(range(50), 0))
    assert list(again.view("rank")) == list(range(50))


def test_the_cache_keeps_the_most_recently_used_clients(tmp_path):
    store = ClientStore(tmp_path, ROOT, cache_clients=4)
    fill(store, range(4))
    store.flush()
    store.get("b", 0)                                              # 0 is now the most recent, 1 the oldest
    fill(store, [10])
    assert 1 not in store._cache and {0, 10} <= set(store._cache)
    reads = []
    store._read = lambda *args, real=store._read: reads.append(args) or real(*args)
    store.get("b", 10), store.get("b", 0)
    assert reads == []                                             # cached: no read
    assert_same(store.get("b", 1), record_of(1)["b"])              # evicted: read back from its segment
    assert len(reads) == 1


def test_a_checkpoint_writes_only_the_clients_that_changed(tmp_path):
    store = ClientStore(tmp_path, ROOT, cache_clients=1000)
    fill(store, range(100))
    store.state_dict()
    before, writes = set(segment_files(tmp_path)), store.writes
    fill(store, [3, 50, 97], version=1)
    meta = store.state_dict()
    new = set(segment_files(tmp_path)) - before
    assert store.writes == writes + 1 and len(new) == 2            # one segment: its records and its index
    sid = max(meta["segments"])
    index = RunStorage.of(tmp_path).read_bytes(index_file(ROOT, sid))
    assert load(index)["client_ids"].tolist() == [3, 50, 97]
    store.state_dict()
    assert store.writes == writes + 1                              # nothing changed: nothing written


def test_an_older_checkpoint_still_sees_its_round_after_the_run_moved_on(tmp_path):
    store = ClientStore(tmp_path, ROOT, cache_clients=6)
    fill(store, range(20))
    first = store.state_dict()
    fill(store, range(0, 20, 2), version=1)                       # half the clients change: copy-on-write
    fill(store, range(30, 40))
    second = store.state_dict()
    moved_on = {c: (1 if c < 20 and c % 2 == 0 else 0) for c in [*range(20), *range(30, 40)]}
    for meta, expected in ((first, dict.fromkeys(range(20), 0)), (second, moved_on)):
        resumed = ClientStore(tmp_path, ROOT, cache_clients=6)
        resumed.load_state_dict(meta)
        check(resumed, expected)
    resumed = ClientStore(tmp_path, ROOT, cache_clients=6)       # resume from the first and go elsewhere
    resumed.load_state_dict(first)
    fill(resumed, range(20), version=2)
    resumed.state_dict()
    later = ClientStore(tmp_path, ROOT)
    later.load_state_dict(second)
    check(later, moved_on)


def test_files_stay_bounded_when_the_same_clients_keep_changing(tmp_path):
    """Unlisted segments die as soon as nothing live is left in them; half-empty listed ones are compacted."""
    store = ClientStore(tmp_path, ROOT, cache_clients=4)
    for version in range(30):
        fill(store, range(10), version=version)
        meta = store.state_dict()
    assert len(meta["segments"]) <= 3
    resumed = ClientStore(tmp_path, ROOT)
    resumed.load_state_dict(meta)
    check(resumed, dict.fromkeys(range(10), 29))
    unlisted = ClientStore(tmp_path / "other", ROOT, cache_clients=4)
    for version in range(30):                                      # evictions only, never a checkpoint
        fill(unlisted, range(10), version=version)
    assert len(list((tmp_path / "other" / ROOT).glob("seg-*"))) <= 6


def test_pruning_checkpoints_deletes_the_segments_only_they_listed(tmp_path):
    store = ClientStore(tmp_path, ROOT)
    metas = []
    for rnd in (1, 2, 3):
        fill(store, range(rnd * 5), version=rnd)                  # every client changes every round
        metas.append(store.state_dict())
        save_checkpoint(tmp_path, {"x": np.zeros(1)}, {"round": rnd, "aggregator": {"client_store": metas[-1]}},
                        keep=2)
    storage = RunStorage.of(tmp_path)
    for sid in metas[0]["segments"]:
        assert not storage.exists(data_file(ROOT, sid)) and not storage.exists(index_file(ROOT, sid))
    for sid in metas[1]["segments"] + metas[2]["segments"]:
        assert storage.exists(data_file(ROOT, sid))
    tensors, meta, name = load_newest_intact(tmp_path)
    resumed = ClientStore(tmp_path, ROOT)
    resumed.load_state_dict(meta["aggregator"]["client_store"])
    check(resumed, dict.fromkeys(range(15), 3))


def test_segments_written_after_the_newest_checkpoint_are_dropped_on_resume(tmp_path):
    """A run that stops between checkpoints leaves segments no checkpoint lists; resuming deletes exactly
    those, and the resumed store still reads the checkpoint's state."""
    store = ClientStore(tmp_path, ROOT)
    fill(store, range(10), version=1)
    meta = store.state_dict()
    save_checkpoint(tmp_path, {"x": np.zeros(1)}, {"round": 1, "aggregator": {"client_store": meta}})
    fill(store, range(5, 20), version=2)
    store.flush()                                                # written, then the run stops
    storage = RunStorage.of(tmp_path)
    before = set(stored_segments(storage))
    listed = {data_file(ROOT, sid) for sid in meta["segments"]} | {index_file(ROOT, sid) for sid in meta["segments"]}
    assert before > listed                                       # the unlisted segments exist
    assert drop_orphan_segments(tmp_path) == len(before - listed)
    assert set(stored_segments(storage)) == listed
    resumed = ClientStore(tmp_path, ROOT)
    resumed.load_state_dict(load_newest_intact(tmp_path)[1]["aggregator"]["client_store"])
    check(resumed, dict.fromkeys(range(10), 1))
    assert drop_orphan_segments(tmp_path) == 0                   # nothing else to drop


def test_checkpoints_of_20000_celora_like_clients_stay_small(tmp_path):
    """20,000 clients with a core, a frame and a descriptor each: held inline, the checkpoint's header would
    have 20,000 × 5 tensor entries; with the store it holds a list of segments, and no file has a big header."""
    store = ClientStore(tmp_path, ROOT, cache_clients=512, segment_bytes=8 << 20)
    rng = np.random.default_rng(0)
    modules = ("layer.0.q", "layer.0.v")
    for cid in range(20_000):
        store.put("client_c", cid, {m: rng.standard_normal((2, 2)).astype(np.float32) for m in modules})
        store.put("client_ab", cid, {modules[0]: (np.full((2, 8), cid, np.float32), np.ones((8, 2), np.float32))})
        store.put("descriptors", cid, np.full(4, cid / 7))
    meta = {"round": 1, "aggregator": {"client_store": store.state_dict()}}
    location = save_checkpoint(tmp_path, {"agg/global": np.zeros(4)}, meta)
    assert (tmp_path / "checkpoints" / "round-0001" / "state.safetensors").stat().st_size < 4096
    assert len(json.dumps(meta)) < 4096 and location
    data = (tmp_path / ROOT / f"seg-{meta['aggregator']['client_store']['segments'][0]:08d}.bin").read_bytes()
    assert int.from_bytes(data[:8], "little") < 4096               # the first record's header
    assert max(p.stat().st_size for p in (tmp_path / ROOT).glob("seg-*")) <= (8 << 20) + 4096
    resumed = ClientStore(tmp_path, ROOT, cache_clients=16)
    resumed.load_state_dict(load_newest_intact(tmp_path)[1]["aggregator"]["client_store"])
    for cid in (0, 12_345, 19_999):
        assert resumed.get("client_ab", cid)[modules[0]][0][0, 0] == cid
        assert resumed.get("descriptors", cid)[0] == cid / 7


@pytest.mark.parametrize("stored", [False, True])
def test_local_heads_in_the_store_round_trip(tmp_path, stored):
    initial = {"classifier.weight": np.zeros((2, 3), np.float32)}
    make = lambda: HeadState(initial, "local", trained=True,                       # noqa: E731
                             store=ClientStore(tmp_path, "client_state/heads", cache_clients=2) if stored else None)
    heads = make()
    for rnd in range(1, 4):
        new = {cid: {"classifier.weight": np.full((2, 3), 10 * rnd + cid, np.float32)} for cid in (rnd, rnd + 1)}
        heads.update(new, {cid: 0.5 for cid in new})
    tensors, meta = heads.state_dict()
    assert ("client_store" in meta) == stored and any(k.startswith("client_head/") for k in tensors) != stored
    again = make()
    again.load_state_dict(tensors, json.loads(json.dumps(meta)))
    for cid, value in ((1, 11), (2, 22), (3, 33), (4, 34)):
        assert again.start_for(cid)["classifier.weight"][0, 0] == value
    assert again.start_for(9) is again.initial
    np.testing.assert_array_equal(again.global_head["classifier.weight"], heads.global_head["classifier.weight"])
