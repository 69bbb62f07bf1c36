"""Per-client state kept in files on the run's storage, with a small in-memory cache (`ClientStore`).

Each client's state is one record (attribute name -> value, any value `raysim.aggregators.state.encode`
takes: a client's B_k, CE-LoRA's core and frame, a pruned rank, a classifier head). Records live in
append-only segment files under `root` (a folder of the run's `RunStorage`):

- `seg-NNNNNNNN.bin`: the records, one after another, each a small self-contained safetensors blob (its
  tensors and, in its metadata, how to put them together again), so no file has a large header;
- `seg-NNNNNNNN.idx.safetensors`: which client's record lies where (client ids, byte offsets, lengths).

Records that changed since the last write (dirty) stay in memory until the cache runs full or a checkpoint
is taken; then they are all written as one new segment. Files are never rewritten (copy-on-write): a
newer record of a client goes to a newer segment, so the segments listed by an older checkpoint still
hold exactly that round's state. A checkpoint (`state_dict`) records only the list of live segments, and
writes only the records changed since the previous one. Segments of which less than half is still live
are compacted: their live records are copied into a new segment. Segments no checkpoint has listed are
deleted as soon as nothing live is left in them; listed ones are deleted by checkpoint pruning
(`raysim.checkpoint`) once no kept checkpoint lists them (`referenced_files`).

Reading a client costs one ranged read of its record; the index (which segment, offset and length per
client) is three numpy arrays, 16 bytes per client with state.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from raysim.aggregators.state import decode, encode
from raysim.storage import RunStorage

SEGMENT_BYTES = 64 << 20            # a flush is split into segments of at most this many bytes
_MISSING = object()
_SEGMENT = re.compile(r"^seg-(\d+)\.(bin|idx\.safetensors)$")


def encode_record(record: dict[str, Any]) -> bytes:
    """One client's record as a self-contained safetensors blob (tensors + JSON layout in its metadata)."""
    tensors: dict[str, np.ndarray] = {}
    layout = {attr: encode(value, attr, tensors) for attr, value in record.items()}
    return safetensors.numpy.save(tensors, metadata={"record": json.dumps(layout)})


def decode_record(data: bytes) -> dict[str, Any]:
    """The record `encode_record` wrote, arrays bit for bit."""
    n = int.from_bytes(data[:8], "little")
    layout = json.loads(json.loads(data[8:8 + n])["__metadata__"]["record"])
    tensors = safetensors.numpy.load(data)
    return {attr: decode(node, attr, tensors) for attr, node in layout.items()}


def data_file(root: str, segment: int) -> str:
    return f"{root}/seg-{segment:08d}.bin"


def index_file(root: str, segment: int) -> str:
    return f"{root}/seg-{segment:08d}.idx.safetensors"


def referenced_files(meta: Any) -> set[str]:
    """Every segment file (relative to the run directory) a checkpoint's metadata lists, wherever a
    `{"client_store": {"root": ..., "segments": [...]}}` entry sits in it."""
    found: set[str] = set()
    stack = [meta]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            entry = node.get("client_store")
            if isinstance(entry, dict) and "root" in entry and "segments" in entry:
                for sid in entry["segments"]:
                    found |= {data_file(entry["root"], int(sid)), index_file(entry["root"], int(sid))}
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def segment_files(storage: RunStorage, top: str = "client_state") -> list[str]:
    """Every segment file (data and index) of every store under folder `top` of the run directory."""
    return [f"{top}/{part}/{name}" for part in storage.listdir(top)
            for name in storage.listdir(f"{top}/{part}") if _SEGMENT.match(name)]


class ClientStore:
    """Client id -> record, on `storage` under `root`, at most about `cache_clients` records in memory."""

    def __init__(self, storage, root: str = "client_state", cache_clients: int = 4096,
                 segment_bytes: int = SEGMENT_BYTES):
        self.storage = RunStorage.of(storage)
        self.root = root.strip("/")
        self.cache_clients = max(1, int(cache_clients))
        self.segment_bytes = int(segment_bytes)
        self.writes = 0                         # segments written so far (tests, benchmarks)
        self._next: int | None = None           # next segment id; found from the files on first write
        self.clear()

    def clear(self) -> None:
        """Forget every record (a new run). Files stay: a checkpoint may list them."""
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()   # LRU order, newest last
        self._dirty: set[int] = set()
        self._seg = np.zeros(0, dtype=np.int32)      # client -> segment holding its record (-1: none)
        self._off = np.zeros(0, dtype=np.int64)      # client -> byte offset of its record there
        self._len = np.zeros(0, dtype=np.int64)      # client -> record length
        self._live: dict[int, list[int]] = {}        # live segment -> [live records, records]
        self._published: set[int] = set()            # segments a checkpoint listed: only pruning deletes them

    def view(self, attr: str) -> "ClientStateView":
        return ClientStateView(self, attr)

    # -- records ------------------------------------------------------------------------------------

    def get(self, attr: str, client_id: int, default: Any = None) -> Any:
        record = self._record(int(client_id))
        return default if record is None else record.get(attr, default)

    def put(self, attr: str, client_id: int, value: Any) -> None:
        """Set one attribute of a client's record. Values are kept as given: replace them, never mutate."""
        cid = int(client_id)
        record = self._record(cid)
        if record is None:
            record = self._cache[cid] = {}
        record[attr] = value
        self._dirty.add(cid)
        self._shrink()

    def client_ids(self) -> list[int]:
        """Every client with a record, ascending (reads no record)."""
        on_disk = np.nonzero(self._seg >= 0)[0].tolist()
        return sorted(set(on_disk) | set(self._cache))

    def _record(self, cid: int) -> dict[str, Any] | None:
        if cid in self._cache:
            self._cache.move_to_end(cid)
            return self._cache[cid]
        if cid >= len(self._seg) or self._seg[cid] < 0:
            return None
        record = self._cache[cid] = decode_record(self._read(int(self._seg[cid]), int(self._off[cid]),
                                                             int(self._len[cid])))
        self._shrink()
        return record

    def _read(self, segment: int, offset: int, length: int) -> bytes:
        with self.storage.fs.open_input_file(self.storage.path(data_file(self.root, segment))) as f:
            return f.read_at(length, offset)

    def _shrink(self) -> None:
        """Over the limit: write the dirty records if they fill half of it, then drop the oldest clean
        records down to 3/4 of it (so that the scan runs once per quarter of the cache)."""
        if len(self._cache) <= self.cache_clients:
            return
        if 2 * len(self._dirty) > self.cache_clients:
            self.flush()
        excess = len(self._cache) - max(1, (3 * self.cache_clients) // 4)
        newest = next(reversed(self._cache))          # the record being read or written stays
        for cid in [c for c in self._cache if c not in self._dirty and c != newest][:excess]:
            del self._cache[cid]

    # -- segments -------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every dirty record into new segments, then compact segments less than half live."""
        if self._dirty:
            cids = sorted(self._dirty)
            self._write(cids, [encode_record(self._cache[c]) for c in cids])
            self._dirty.clear()
        self._compact()

    def _write(self, cids: list[int], blobs: list[bytes]) -> None:
        """Append records as new segments of at most `segment_bytes` each; the index then points at them."""
        start, size = 0, 0
        for i, blob in enumerate(blobs):
            size += len(blob)
            if size >= self.segment_bytes or i == len(blobs) - 1:
                self._write_segment(cids[start:i + 1], blobs[start:i + 1])
                start, size = i + 1, 0

    def _write_segment(self, cids: list[int], blobs: list[bytes]) -> None:
        sid = self._new_segment()
        ids = np.asarray(cids, dtype=np.int64)
        lengths = np.array([len(b) for b in blobs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.storage.write_bytes(data_file(self.root, sid), b"".join(blobs))
        self.storage.write_bytes(index_file(self.root, sid), safetensors.numpy.save(
            {"client_ids": ids, "offsets": offsets, "lengths": lengths}))
        self.writes += 1
        self._point(sid, ids, offsets, lengths)

    def _point(self, sid: int, ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
               delete: bool = True) -> None:
        """Index the records of segment `sid`; segments left without a live record are dropped."""
        if len(ids) and ids.max() >= len(self._seg):
            grow = max(int(ids.max()) + 1, 2 * len(self._seg)) - len(self._seg)
            self._seg = np.concatenate([self._seg, np.full(grow, -1, dtype=np.int32)])
            self._off = np.concatenate([self._off, np.zeros(grow, dtype=np.int64)])
            self._len = np.concatenate([self._len, np.zeros(grow, dtype=np.int64)])
        old, counts = np.unique(self._seg[ids], return_counts=True)
        self._seg[ids], self._off[ids], self._len[ids] = sid, offsets, lengths
        self._live[sid] = [len(ids), len(ids)]
        for s, n in zip(old.tolist(), counts.tolist()):
            if s >= 0:
                self._live[s][0] -= n
                if self._live[s][0] == 0:
                    self._drop(s, delete)

    def _drop(self, sid: int, delete: bool) -> None:
        del self._live[sid]
        if delete and sid not in self._published:
            self.storage.delete(data_file(self.root, sid))
            self.storage.delete(index_file(self.root, sid))

    def _compact(self) -> None:
        """Copy the live records of every segment less than half live into a new segment."""
        sparse = [sid for sid, (live, total) in self._live.items() if 2 * live < total]
        if not sparse:
            return
        cids: list[int] = []
        blobs: list[bytes] = []
        for sid in sparse:
            idx = safetensors.numpy.load(self.storage.read_bytes(index_file(self.root, sid)))
            ids, offsets = idx["client_ids"], idx["offsets"]
            live = (self._seg[ids] == sid) & (self._off[ids] == offsets)
            data = self.storage.read_bytes(data_file(self.root, sid))
            for cid, off, n in zip(ids[live].tolist(), offsets[live].tolist(), idx["lengths"][live].tolist()):
                cids.append(cid)
                blobs.append(data[off:off + n])
        self._write(cids, blobs)            # the old segments lose their last live records and are dropped

    def _new_segment(self) -> int:
        if self._next is None:            # never reuse a file name already there (a crashed or rewound run's)
            found = [int(m.group(1)) for name in self.storage.listdir(self.root) if (m := _SEGMENT.match(name))]
            self._next = max(found, default=-1) + 1
        self._next += 1
        return self._next - 1

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Write what changed and return the checkpoint's entry: the folder and its live segments."""
        self.flush()
        segments = sorted(self._live)
        self._published.update(segments)
        return {"root": self.root, "segments": segments}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        """Restore the state a checkpoint entry (`state_dict`) lists, from its segments' indexes."""
        if meta["root"] != self.root:
            raise ValueError(f"checkpoint keeps client state under {meta['root']!r}, this store uses {self.root!r}")
        self.clear()
        for sid in sorted(int(s) for s in meta["segments"]):
            idx = safetensors.numpy.load(self.storage.read_bytes(index_file(self.root, sid)))
            self._point(sid, idx["client_ids"], idx["offsets"], idx["lengths"], delete=False)
        self._published.update(int(s) for s in meta["segments"])


class ClientStateView(Mapping):
    """One attribute of every client's record, as a dict client id -> value (what `client_state` declares).

    Reads and writes go through the store's cache. Iterating reads every record (slow for many clients:
    meant for tests and small runs). Replace a value to change it; mutating one in place is not recorded."""

    def __init__(self, store: ClientStore, attr: str):
        self.store = store
        self.attr = attr

    def __getitem__(self, client_id: int) -> Any:
        value = self.store.get(self.attr, client_id, _MISSING)
        if value is _MISSING:
            raise KeyError(client_id)
        return value

    def __contains__(self, client_id: object) -> bool:
        if not isinstance(client_id, (int, np.integer)):
            return False
        return self.store.get(self.attr, client_id, _MISSING) is not _MISSING

    def get(self, client_id: int, default: Any = None) -> Any:
        return self.store.get(self.attr, client_id, default)

    def __setitem__(self, client_id: int, value: Any) -> None:
        self.store.put(self.attr, client_id, value)

    def update(self, items: Mapping[int, Any]) -> None:
        for cid, value in items.items():
            self[cid] = value

    def __iter__(self) -> Iterator[int]:
        return iter([cid for cid in self.store.client_ids() if cid in self])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"ClientStateView({self.attr!r}, {self.store.storage.uri(self.store.root)})"
