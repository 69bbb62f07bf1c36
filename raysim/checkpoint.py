"""Round checkpoints: `checkpoints/round-NNNN/` with state.safetensors + state.json (no pickle).

state.json carries the format version, the round, the hash of the run's config (`config_hash`), the size
and sha256 of state.safetensors, and the caller's metadata under `meta`. It is written last, so a
checkpoint directory without it is incomplete. Both files go through `RunStorage` (atomic writes, local
disk or any `pyarrow.fs` filesystem). Checkpoints are ordered by their round number, not by name, so
round-10000 comes after round-9999.

Per-client state kept in a `raysim.client_store.ClientStore` is not in these files: the metadata lists the
store's segment files, which live outside the checkpoint directories and are shared between checkpoints
(copy-on-write); pruning deletes the segment files that only the pruned checkpoints listed.

Loading verifies the version and the checksum; `load_newest_intact` skips a truncated, tampered or
incomplete checkpoint with a `CheckpointWarning` naming it and falls back to the previous one. A
checkpoint of a different configuration raises `CheckpointMismatch`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from raysim.storage import RunStorage

FORMAT_VERSION = 1
ROOT = "checkpoints"
STATE = "state.safetensors"
HEADER = "state.json"
# keys a resumed run may change without changing what is computed (dotted; a section name drops it whole)
CONFIG_HASH_EXCLUDED = ("name", "federation.rounds", "federation.round_timeout_s", "federation.hung_after_s", "output",
                        "resources")   # what may change on --resume: see raysim.cli.RESUME_KEYS
_NAME = re.compile(r"^round-(\d+)$")


class CheckpointError(Exception):
    """A run directory's checkpoints cannot be used to resume it."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that is incomplete, truncated, modified or of an unknown format."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint written by a run with a different configuration."""


class CheckpointWarning(UserWarning):
    """A broken checkpoint was skipped in favour of an older one."""


def checkpoint_name(rnd: int) -> str:
    return f"round-{int(rnd):04d}"


def config_hash(cfg: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON, leaving out the keys a resume may change
    (CONFIG_HASH_EXCLUDED)."""
    trimmed = copy.deepcopy(cfg)
    for key in CONFIG_HASH_EXCLUDED:
        *parents, leaf = key.split(".")
        node = trimmed
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(trimmed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checkpoint_rounds(run_dir) -> list[tuple[int, str]]:
    """(round, directory name) of every checkpoint directory, complete or not, oldest first."""
    found = [(int(m.group(1)), name) for name in RunStorage.of(run_dir).listdir(ROOT) if (m := _NAME.match(name))]
    return sorted(found)


def save_checkpoint(run_dir, tensors: dict[str, np.ndarray], meta: dict[str, Any], keep: int = 2,
                    config_hash: str | None = None) -> str:
    """Write the checkpoint of round `meta["round"]`, then prune; returns its location (path or URI).

    Pruning keeps the newest `keep` complete checkpoints up to this round and deletes only older ones:
    a checkpoint of a later round (another run's in a reused directory) is never deleted."""
    storage = RunStorage.of(run_dir)
    rnd = int(meta["round"])
    rel = f"{ROOT}/{checkpoint_name(rnd)}"
    storage.delete(_at(rel, HEADER))              # rewriting a round: incomplete until the new header lands
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    storage.write_bytes(_at(rel, STATE), data)
    header = {"format_version": FORMAT_VERSION, "round": rnd, "config_hash": config_hash,
              "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}
    storage.write_text(_at(rel, HEADER), json.dumps(header))
    _prune(storage, rnd, max(int(keep), 1))
    return storage.uri(rel)


def _prune(storage: RunStorage, written: int, keep: int) -> None:
    """Delete the checkpoints older than the keep-th newest complete one at or below round `written`."""
    rounds = checkpoint_rounds(storage)
    complete = [rnd for rnd, name in rounds if rnd <= written and _is_complete(storage, f"{ROOT}/{name}")]
    if len(complete) < keep:
        return
    oldest_kept = complete[-keep]
    pruned = [name for rnd, name in rounds if rnd < oldest_kept]
    if not pruned:
        return
    listed = _listed_files(storage, pruned)
    for name in pruned:
        storage.delete_dir(f"{ROOT}/{name}")
    kept = _listed_files(storage, [name for rnd, name in rounds if rnd >= oldest_kept])
    for rel in sorted(listed - kept):
        storage.delete(rel)


def drop_orphan_segments(run_dir) -> int:
    """Delete the client-store segment files that no checkpoint lists: those a run wrote after its newest
    checkpoint and before it stopped (a resumed run restarts from a checkpoint and never reads them, and
    checkpoint pruning only deletes listed files). Returns how many files were deleted."""
    from raysim.client_store import segment_files

    storage = RunStorage.of(run_dir)
    listed = _listed_files(storage, [name for _, name in checkpoint_rounds(storage)])
    orphans = [rel for rel in segment_files(storage) if rel not in listed]
    for rel in orphans:
        storage.delete(rel)
    return len(orphans)


def _listed_files(storage: RunStorage, names: list[str]) -> set[str]:
    """The client-store segment files the headers of checkpoints `names` list (unreadable headers: none)."""
    from raysim.client_store import referenced_files

    found: set[str] = set()
    for name in names:
        try:
            found |= referenced_files(_read_header(storage, f"{ROOT}/{name}").get("meta"))
        except CorruptCheckpoint:
            continue
    return found


def _is_complete(storage: RunStorage, rel: str) -> bool:
    """A readable header of this format and a state file of the recorded size (the full checksum is
    verified when loading)."""
    try:
        header = _read_header(storage, rel)
    except CorruptCheckpoint:
        return False
    return storage.size(_at(rel, STATE)) == header.get("size")


def _at(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _read_header(storage: RunStorage, rel: str) -> dict[str, Any]:
    try:
        header = json.loads(storage.read_text(_at(rel, HEADER)))
    except OSError:
        raise CorruptCheckpoint(f"no {HEADER}: the checkpoint was never completed") from None
    except ValueError:
        raise CorruptCheckpoint(f"{HEADER} is not valid JSON (truncated?)") from None
    version = header.get("format_version") if isinstance(header, dict) else None
    if version != FORMAT_VERSION:
        raise CorruptCheckpoint(f"format version {version!r}, this raysim reads version {FORMAT_VERSION}")
    return header


def _load(storage: RunStorage, rel: str, expected_hash: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    header = _read_header(storage, rel)
    found = header.get("config_hash")
    if expected_hash is not None and found is not None and found != expected_hash:
        raise CheckpointMismatch(
            f"checkpoint {storage.uri(rel)} was written by a run with a different configuration "
            f"(config hash {found[:12]}, this config {expected_hash[:12]}); only keys like federation.rounds "
            "and output.* may change on resume")
    try:
        data = storage.read_bytes(_at(rel, STATE))
    except OSError:
        raise CorruptCheckpoint(f"{STATE} is missing") from None
    if hashlib.sha256(data).hexdigest() != header.get("sha256"):
        raise CorruptCheckpoint(f"{STATE} does not match its checksum ({len(data)} bytes, "
                                f"{header.get('size')} recorded): truncated or modified")
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # noqa: BLE001 - any decoding error means the same: unusable
        raise CorruptCheckpoint(f"{STATE} cannot be decoded: {exc}") from None
    return tensors, header["meta"]


def load_newest_intact(run_dir, config_hash: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any], str] | None:
    """(tensors, meta, name) of the newest checkpoint that verifies, or None when the run has none.

    A broken checkpoint is skipped with a CheckpointWarning naming it. When checkpoints exist but none
    verifies, CorruptCheckpoint is raised (a resume must not silently start over). With `config_hash`, a
    checkpoint of another configuration raises CheckpointMismatch (checkpoints saved without one pass)."""
    storage = RunStorage.of(run_dir)
    rounds = checkpoint_rounds(storage)
    for _, name in reversed(rounds):
        rel = f"{ROOT}/{name}"
        try:
            tensors, meta = _load(storage, rel, config_hash)
        except CorruptCheckpoint as exc:
            warnings.warn(f"checkpoint {storage.uri(rel)} skipped: {exc}; falling back to the previous one",
                          CheckpointWarning, stacklevel=2)
            continue
        return tensors, meta, name
    if rounds:
        raise CorruptCheckpoint(f"none of the {len(rounds)} checkpoints in {storage.uri(ROOT)} is intact")
    return None


def drop_checkpoints_after(run_dir, rnd: int) -> None:
    """Delete the checkpoints of rounds after `rnd` (a trial rewound to an earlier round by Tune)."""
    storage = RunStorage.of(run_dir)
    for r, name in checkpoint_rounds(storage):
        if r > rnd:
            storage.delete_dir(f"{ROOT}/{name}")


# -- the earlier API, kept for existing callers -------------------------------------------------------


def latest_checkpoint(run_dir) -> Path | str | None:
    """The location of the newest intact checkpoint (a Path on local disk, else a URI), or None."""
    storage = RunStorage.of(run_dir)
    found = load_newest_intact(storage)
    if found is None:
        return None
    rel = f"{ROOT}/{found[2]}"
    return storage.local_path(rel) if storage.is_local else storage.uri(rel)


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, meta) of one checkpoint directory (path or URI), verified; CorruptCheckpoint if broken."""
    return _load(RunStorage.of(path), "", None)
