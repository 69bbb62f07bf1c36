"""Where a run or a sweep keeps its files: a local directory or any `pyarrow.fs` filesystem URI.

`RunStorage.of(target)` takes a local path (`runs/x`), a `file://` URI or an object-store URI such as
`s3://bucket/prefix` or `gs://bucket/prefix`. An S3-compatible endpoint is given in the URI's query
(`s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&scheme=http`) or through the environment
(`AWS_ENDPOINT_URL`, credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or the usual AWS
configuration); see `pyarrow.fs.S3FileSystem` for every option.

Every write is atomic, so a reader or a resumed run never sees half a file:
- local disk: the bytes go to a hidden temporary file in the same directory, which is fsync'ed and renamed
  over the target (`os.replace`), then the directory itself is fsync'ed so the rename survives a crash;
- object stores: one upload, which becomes visible only once complete.
Paths below the root (`rel`) always use `/`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def _is_uri(target: str) -> bool:
    return "://" in target


def is_node_local(target: "str | os.PathLike | RunStorage") -> bool:
    """True when `target` lives on one machine's disk (a path or `file://`): on a multi-node cluster the
    other nodes cannot see it, so it cannot hold a run's or a sweep's outputs there."""
    if isinstance(target, RunStorage):
        return target.is_local
    text = os.fspath(target)
    return not _is_uri(text) or urlsplit(text).scheme == "file"


def refuse_node_local(target: "str | os.PathLike | RunStorage") -> None:
    """ConfigError when `target` is on this machine's disk while the Ray cluster has several nodes: workers
    and sweep trials run on any of them. A path on a filesystem every node mounts: RAYSIM_SHARED_OUT=1."""
    import ray

    from raysim.errors import ConfigError

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and is_node_local(target) and not os.environ.get("RAYSIM_SHARED_OUT"):
        raise ConfigError(f"{RunStorage.of(target).uri()} is on this machine's local disk, but the Ray cluster has "
                          f"{len(nodes)} nodes and runs work on any of them; give shared storage (--out "
                          "s3://bucket/prefix, gs://..., or a path on a filesystem every node mounts, with "
                          "RAYSIM_SHARED_OUT=1)")


class RunStorage:
    """A filesystem and a root directory in it; every method takes a path relative to the root."""

    def __init__(self, fs: pafs.FileSystem, root: str, base_uri: str | None = None, query: str = ""):
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self._base_uri = (base_uri or self.root).rstrip("/")
        self._query = query

    @classmethod
    def of(cls, target: "str | os.PathLike | RunStorage") -> "RunStorage":
        """A storage for a local path or a filesystem URI (an existing RunStorage is returned as is)."""
        if isinstance(target, RunStorage):
            return target
        text = os.fspath(target)
        if not _is_uri(text):
            return cls(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
        fs, root = pafs.FileSystem.from_uri(text)
        if isinstance(fs, pafs.LocalFileSystem):
            return cls(fs, root)
        parts = urlsplit(text)
        host = parts.netloc.rsplit("@", 1)[-1]               # credentials in the URI are never repeated
        query = urlencode(parse_qsl(parts.query))
        return cls(fs, root, base_uri=f"{parts.scheme}://{host}{parts.path}", query=query)

    # -- names ----------------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """The path of `rel` inside the filesystem (what pyarrow's `filesystem=` arguments take)."""
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def uri(self, rel: str = "") -> str:
        """`rel` as the user would write it: a local path, or the URI with its options but without
        credentials (`s3://KEY:SECRET@bucket/...`); `RunStorage.of(storage.uri(rel))` opens the same place
        (credentials then come from the environment)."""
        if self.is_local:
            return self.path(rel)
        text = f"{self._base_uri}/{rel}" if rel else self._base_uri
        return f"{text}?{self._query}" if self._query else text

    def child(self, rel: str) -> "RunStorage":
        """The storage rooted at `rel` (e.g. one trial's run directory inside a sweep)."""
        if self.is_local:
            return RunStorage(self.fs, self.path(rel))
        return RunStorage(self.fs, self.path(rel), f"{self._base_uri}/{rel}", self._query)

    def local_path(self, rel: str = "") -> Path:
        """The local `Path` of `rel`; only for a local storage."""
        if not self.is_local:
            raise ValueError(f"{self.uri(rel)} is not on the local disk")
        return Path(self.path(rel))

    @property
    def storage_path(self) -> str:
        """With `fs`, what Ray Tune takes: `RunConfig(storage_path=s.storage_path, storage_filesystem=s.fs)`
        (the path inside the filesystem, no scheme)."""
        return self.root

    def __repr__(self) -> str:
        return f"RunStorage({self.uri()!r})"

    def __str__(self) -> str:
        return self.uri()

    # -- reading --------------------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def size(self, rel: str) -> int | None:
        """The size of file `rel` in bytes, None when there is no such file."""
        info = self.fs.get_file_info(self.path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def listdir(self, rel: str = "") -> list[str]:
        """The sorted names directly inside directory `rel` (files and directories; [] when missing)."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def read_parquet(self, rel: str, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
        """One Parquet file, or a Parquet dataset directory (its hidden temporary files are skipped; with
        `schema`, columns a file lacks read as nulls)."""
        return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns, schema=schema)

    # -- writing --------------------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        """Create directory `rel` (object stores have no directories: nothing to do there)."""
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write file `rel` atomically: readers see the old content or the new, never a part."""
        if self.is_local:
            _atomic_local_write(self.path(rel), data)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue().to_pybytes())

    def delete(self, rel: str) -> None:
        """Delete file `rel` (nothing when it does not exist)."""
        if self.is_file(rel):
            self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        """Delete directory `rel` and everything in it (nothing when it does not exist)."""
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))


def _atomic_local_write(target: str, data: bytes) -> None:
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")     # hidden: readers skip it
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                  # mkstemp makes it 0600; a finished file reads like any other
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(folder)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

