"""Round checkpoints: verified loading with fallback to the previous intact one, numeric order, config
hashes, and pruning that never deletes what it should not."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
from conftest_s3 import s3_server  # noqa: F401 - the fixture

from raysim.checkpoint import (CheckpointMismatch, CheckpointWarning, CorruptCheckpoint, checkpoint_rounds,
                               config_hash, drop_checkpoints_after, latest_checkpoint, load_checkpoint,
                               load_newest_intact, save_checkpoint)
from raysim.storage import RunStorage


def _state(rnd: int) -> tuple[dict[str, np.ndarray], dict]:
    rng = np.random.default_rng(rnd)
    return {"agg/A": rng.standard_normal((4, 3)).astype(np.float32), "agg/n": np.arange(rnd, dtype=np.int64)}, \
        {"round": rnd, "aggregator": {"seen": [rnd]}, "wall_s": 1.5 * rnd}


def _save(target, *rounds, keep=2, chash=None):
    for rnd in rounds:
        save_checkpoint(target, *_state(rnd), keep=keep, config_hash=chash)


def _names(run_dir) -> list[str]:
    return [name for _, name in checkpoint_rounds(run_dir)]


def _load_warned(target, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = load_newest_intact(target, **kw)
    return found, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def test_round_trip_with_version_hash_and_checksum(tmp_path):
    tensors, meta = _state(3)
    where = save_checkpoint(tmp_path, tensors, meta, config_hash="abc")
    assert where == str(tmp_path / "checkpoints" / "round-0003")
    header = json.loads((tmp_path / "checkpoints" / "round-0003" / "state.json").read_text())
    data = (tmp_path / "checkpoints" / "round-0003" / "state.safetensors").read_bytes()
    assert header["format_version"] == 1 and header["round"] == 3 and header["config_hash"] == "abc"
    assert header["sha256"] == hashlib.sha256(data).hexdigest() and header["size"] == len(data)
    got, got_meta, name = load_newest_intact(tmp_path, config_hash="abc")
    assert name == "round-0003" and got_meta == meta
    assert set(got) == set(tensors) and all(np.array_equal(got[k], tensors[k]) for k in tensors)


def test_rounds_sort_by_number_past_9999(tmp_path):
    _save(tmp_path, 9998, 9999, 10000)
    assert _names(tmp_path) == ["round-9999", "round-10000"]        # 9998 pruned, not 10000
    _save(tmp_path, 10001)
    assert _names(tmp_path) == ["round-10000", "round-10001"]
    assert load_newest_intact(tmp_path)[1]["round"] == 10001


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _save(tmp_path, 1, 2)
    state = tmp_path / "checkpoints" / "round-0002" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:50])
    (tensors, meta, name), warned = _load_warned(tmp_path)
    assert name == "round-0001" and meta["round"] == 1
    assert np.array_equal(tensors["agg/A"], _state(1)[0]["agg/A"])
    assert len(warned) == 1 and "round-0002" in warned[0] and "truncated" in warned[0]


def test_a_tampered_checkpoint_of_the_same_size_falls_back(tmp_path):
    _save(tmp_path, 1, 2)
    state = tmp_path / "checkpoints" / "round-0002" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF                                                  # a tensor byte, same length
    state.write_bytes(bytes(data))
    (_, meta, name), warned = _load_warned(tmp_path)
    assert name == "round-0001" and "checksum" in warned[0]


@pytest.mark.parametrize("header", [None, "{not json", json.dumps({"format_version": 99, "round": 2})])
def test_an_incomplete_or_unknown_header_falls_back(tmp_path, header):
    _save(tmp_path, 1, 2)
    path = tmp_path / "checkpoints" / "round-0002" / "state.json"
    if header is None:
        path.unlink()
    else:
        path.write_text(header)
    (_, _, name), warned = _load_warned(tmp_path)
    assert name == "round-0001" and "round-0002" in warned[0]


def test_a_crash_while_rewriting_a_round_leaves_it_incomplete_not_wrong(tmp_path, monkeypatch):
    _save(tmp_path, 1, 2)

    def crash(self, rel, text):
        raise OSError("killed")

    monkeypatch.setattr(RunStorage, "write_text", crash)             # the header is the last write
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, *_state(2))
    monkeypatch.undo()
    (_, _, name), warned = _load_warned(tmp_path)
    assert name == "round-0001" and "never completed" in warned[0]


def test_no_intact_checkpoint_is_an_error_and_none_at_all_is_none(tmp_path):
    assert load_newest_intact(tmp_path) is None
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / "round-0001" / "state.safetensors").write_bytes(b"")
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpoint, match="none of the 1"):
        load_newest_intact(tmp_path)


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    _save(tmp_path, 1, chash="a" * 64)
    with pytest.raises(CheckpointMismatch, match="different configuration"):
        load_newest_intact(tmp_path, config_hash="b" * 64)
    assert load_newest_intact(tmp_path, config_hash="a" * 64)[2] == "round-0001"


def test_config_hash_ignores_only_the_keys_a_resume_may_change():
    cfg = {"name": "a", "seed": 1, "train": {"lr": 0.01}, "federation": {"rounds": 5, "num_clients": 10},
           "output": {"checkpoint_every": 1, "save_updates": False}}
    h = config_hash(cfg)
    assert len(h) == 64 and int(h, 16) >= 0
    same = {"output": {"checkpoint_every": 3}, "federation": {"num_clients": 10, "rounds": 50}, "name": "b",
            "train": {"lr": 0.01}, "seed": 1}                         # other order, allowed changes
    assert config_hash(same) == h
    assert config_hash({**cfg, "seed": 2}) != h
    assert config_hash({**cfg, "train": {"lr": 0.02}}) != h
    assert config_hash({**cfg, "federation": {"rounds": 5, "num_clients": 11}}) != h
    assert cfg["federation"]["rounds"] == 5 and "output" in cfg     # the caller's dict is not changed


def test_pruning_never_deletes_a_newer_checkpoint(tmp_path):
    _save(tmp_path, 5, 6)                                            # an earlier run in the same directory
    _save(tmp_path, 1, 2, 3)
    assert _names(tmp_path) == ["round-0002", "round-0003", "round-0005", "round-0006"]


def test_pruning_keeps_the_newest_intact_ones(tmp_path):
    _save(tmp_path, 1, 2)
    (tmp_path / "checkpoints" / "round-0002" / "state.json").unlink()   # round 2 broken
    _save(tmp_path, 3)
    assert _names(tmp_path) == ["round-0001", "round-0002", "round-0003"]   # 1 is still one of the 2 intact
    _save(tmp_path, 4)
    assert _names(tmp_path) == ["round-0003", "round-0004"]


def test_the_earlier_api_and_rewinding(tmp_path):
    _save(tmp_path, 1, 2, 3, keep=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "round-0003"
    tensors, meta = load_checkpoint(tmp_path / "checkpoints" / "round-0002")
    assert meta["round"] == 2 and np.array_equal(tensors["agg/n"], np.arange(2))
    drop_checkpoints_after(tmp_path, 1)
    assert _names(tmp_path) == ["round-0001"]
    (tmp_path / "checkpoints" / "round-0001" / "state.safetensors").write_bytes(b"x")
    with pytest.raises(CorruptCheckpoint):
        load_checkpoint(tmp_path / "checkpoints" / "round-0001")


def test_fallback_on_a_real_s3_server(s3_server):  # noqa: F811 - the fixture
    uri = s3_server.uri()
    _save(uri, 1, 2, 3)
    s = RunStorage.of(uri)
    assert s.listdir("checkpoints") == ["round-0002", "round-0003"]
    data = s.read_bytes("checkpoints/round-0003/state.safetensors")
    s.write_bytes("checkpoints/round-0003/state.safetensors", data[: len(data) // 2])
    (tensors, meta, name), warned = _load_warned(uri)
    assert name == "round-0002" and meta == _state(2)[1]
    assert np.array_equal(tensors["agg/A"], _state(2)[0]["agg/A"])
    assert "round-0003" in warned[0] and warned[0].startswith("checkpoint s3://")
    assert load_checkpoint(s.uri("checkpoints/round-0002"))[1]["round"] == 2
