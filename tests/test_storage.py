"""RunStorage: atomic local writes, the same API on a real S3-compatible server, URIs that reopen the
same place, and which targets are node-local."""

from __future__ import annotations

import os
import pickle
from urllib.parse import quote

import pyarrow as pa
import pytest
from conftest_s3 import s3_server  # noqa: F401 - the fixture

from raysim.storage import RunStorage, is_node_local


def test_a_write_that_crashes_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    s = RunStorage.of(tmp_path)
    s.write_text("summary.json", "old")

    def crash(src, dst):
        assert os.path.getsize(src) == len("new content")       # the temporary file was written in full
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        s.write_text("summary.json", "new content")
    monkeypatch.undo()
    assert (tmp_path / "summary.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]                # no temporary file left behind
    s.write_text("summary.json", "new content")
    assert (tmp_path / "summary.json").read_text() == "new content"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_local_files_directories_and_deletion(tmp_path):
    s = RunStorage.of(tmp_path / "run")
    s.write_bytes("a/b/c.bin", b"\x00\x01")                   # parents are created
    s.write_text("a/x.txt", "x")
    assert (tmp_path / "run" / "a" / "b" / "c.bin").read_bytes() == b"\x00\x01"
    assert s.listdir("a") == ["b", "x.txt"] and s.listdir("missing") == []
    assert s.exists("a/b") and s.is_file("a/x.txt") and not s.is_file("a/b")
    assert s.size("a/b/c.bin") == 2 and s.size("a/nothing") is None
    s.delete("a/x.txt")
    s.delete("a/x.txt")                                       # already gone: nothing to do
    s.delete_dir("a/b")
    s.delete_dir("a/b")
    assert s.listdir("a") == [] and (tmp_path / "run" / "a").is_dir()


def test_a_local_path_is_absolute_and_reopens_the_same_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = RunStorage.of("runs/x")
    assert s.is_local and s.uri() == str(tmp_path / "runs" / "x") and s.storage_path == s.uri()
    s.write_text("f.txt", "hi")
    assert RunStorage.of(s.uri("f.txt").rsplit("/", 1)[0]).read_text("f.txt") == "hi"
    assert RunStorage.of(f"file://{tmp_path}/runs/x").read_text("f.txt") == "hi"
    assert s.child("sub").uri("g") == str(tmp_path / "runs" / "x" / "sub" / "g")
    assert s.local_path("f.txt") == tmp_path / "runs" / "x" / "f.txt"


@pytest.mark.parametrize("target, local", [
    ("runs/x", True), ("/abs/x", True), ("file:///tmp/x", True),
    ("s3://bucket/prefix", False), ("gs://bucket/prefix", False), ("hdfs://namenode:8020/x", False),
])
def test_node_local_targets(target, local):
    assert is_node_local(target) is local


def test_the_same_api_on_a_real_s3_server(s3_server):  # noqa: F811 - the fixture
    uri = s3_server.uri()
    s = RunStorage.of(uri)
    assert not s.is_local and not is_node_local(s)
    s.write_text("config.yaml", "a: 1\n")
    s.write_bytes("checkpoints/round-0001/state.bin", b"abc")
    s.write_parquet("rounds.parquet/round-000001.parquet", pa.table({"round": [1]}))
    assert s.listdir() == ["checkpoints", "config.yaml", "rounds.parquet"]
    assert s.read_text("config.yaml") == "a: 1\n" and s.size("checkpoints/round-0001/state.bin") == 3
    assert s.read_parquet("rounds.parquet").to_pylist() == [{"round": 1}]
    s.write_text("config.yaml", "a: 2\n")                          # overwrite
    assert s.read_text("config.yaml") == "a: 2\n"
    s.delete_dir("checkpoints")
    s.delete("config.yaml")
    assert s.listdir() == ["rounds.parquet"] and not s.exists("checkpoints")
    # what Ray Tune takes: the path inside the filesystem, no scheme
    assert s.storage_path == uri.split("://", 1)[1].split("?", 1)[0]
    # a storage travels to Ray workers by pickle and still reaches the server
    assert pickle.loads(pickle.dumps(s)).read_parquet("rounds.parquet").num_rows == 1


def test_an_s3_uri_reopens_the_same_place_without_repeating_secrets(s3_server):  # noqa: F811
    prefix = "uri-roundtrip"
    s = RunStorage.of(s3_server.uri(prefix).replace("s3://", "s3://testing:testing@"))
    s.child("trial-1").write_text("summary.json", "{}")
    again = RunStorage.of(s.child("trial-1").uri())
    assert again.read_text("summary.json") == "{}"
    assert "testing" not in s.uri() and "@" not in s.uri("x")
    assert s.uri("a/b").startswith(f"s3://{s3_server.bucket}/{prefix}/a/b?")


def test_an_s3_endpoint_from_the_environment(s3_server, monkeypatch):  # noqa: F811
    RunStorage.of(s3_server.uri("env-endpoint")).write_text("x.txt", "from the query")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    s = RunStorage.of(f"s3://{s3_server.bucket}/env-endpoint")
    assert s.read_text("x.txt") == "from the query"


def test_query_options_are_encoded_in_uris(s3_server):  # noqa: F811
    s = RunStorage.of(s3_server.uri("enc"))
    assert f"endpoint_override={quote(s3_server.endpoint, safe='')}" in s.uri()
