"""Run directory writer: config.yaml, rounds.parquet, clients.parquet, groups.parquet, modules.parquet, summary.json,
updates/, adapter/.

The run directory is a local path or a filesystem URI (`s3://bucket/prefix`, ...): every file goes
through `raysim.storage.RunStorage`, which writes it atomically (a hard kill leaves the old file or the
new one, never half of one).

`rounds.parquet` and `clients.parquet` are Parquet dataset directories with one file per round
(`round-NNNNNN.parquet`, written atomically), so recording a round costs the same in round 1 and round
10,000, and both stay readable during the run with `pandas.read_parquet(path)` or
`pyarrow.parquet.read_table(path)` (with `filesystem=` for a URI, or `read_rounds`). `summary.json` is
written last, for a finished run, with its `status` (`completed` or `failed`) — a run directory without it
is not complete.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from raysim.storage import RunStorage

ROUND_SCHEMA = pa.schema([
    ("round", pa.int64()), ("wall_s", pa.float64()), ("round_time_s", pa.float64()),
    ("dispatch_s", pa.float64()), ("aggregate_s", pa.float64()), ("accuracy", pa.float64()), ("loss", pa.float64()), ("perplexity", pa.float64()),
    ("exact_match", pa.float64()), ("macro_f1", pa.float64()), ("mcc", pa.float64()), ("pearson", pa.float64()),
    ("spearman", pa.float64()), ("personalized_accuracy", pa.float64()), ("personalized_loss", pa.float64()),
    ("deviation_rel", pa.float64()), ("deviation_rel_round", pa.float64()),
    ("bytes_up", pa.int64()), ("bytes_down", pa.int64()),
    ("clients_sampled", pa.int64()), ("clients_completed", pa.int64()), ("clients_failed", pa.int64()),
    ("clients_rejected", pa.int64()), ("status", pa.string()), ("workers", pa.int64()),
    ("train_loss", pa.float64()), ("aggregator", pa.string()),
])

CLIENT_SCHEMA = pa.schema([
    ("round", pa.int64()), ("client_id", pa.int64()), ("worker", pa.int64()), ("rank", pa.int64()),
    ("num_samples", pa.int64()), ("train_loss", pa.float64()), ("train_time_s", pa.float64()),
    ("bytes_up", pa.int64()), ("local_accuracy", pa.float64()), ("local_loss", pa.float64()), ("status", pa.string()),
    ("error", pa.string()), ("noisy", pa.bool_()),
])


SUMMARY_STATUSES = ("completed", "failed", "running")

GROUP_SCHEMA = pa.schema([
    ("round", pa.int64()), ("group", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
    ("n", pa.int64()),
])

MODULE_SCHEMA = pa.schema([
    ("round", pa.int64()), ("module", pa.string()), ("deviation_rel", pa.float64()), ("ideal_norm", pa.float64()),
])


def group_rows(rnd: int, total, names: list[str]) -> list[dict[str, Any]]:
    """groups.parquet rows of one evaluation (eval.group_by): every metric of every group, with the number of
    examples it was measured on."""
    rows = []
    for code, sums in total.by_group().items():
        for metric, value in sums.metrics().items():
            if value is not None:
                n = sums.sums.get("generated" if metric == "exact_match" else "count", 0)
                rows.append({"round": rnd, "group": names[code], "metric": metric, "value": float(value), "n": int(n)})
    return rows


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table with the fixed columns first; extra columns (e.g. agg_*) appended: text where a value is
    a string, float64 otherwise."""
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    fields = list(schema) + [pa.field(k, _extra_type([r.get(k) for r in rows])) for k in extra]
    full = pa.schema(fields)
    cols = {f.name: [r.get(f.name) for r in rows] for f in full}
    for f in full:
        if pa.types.is_floating(f.type):
            cols[f.name] = [None if v is None else float(v) for v in cols[f.name]]
    return pa.table(cols, schema=full)


def _extra_type(values: list[Any]) -> pa.DataType:
    return pa.string() if any(isinstance(v, str) for v in values) else pa.float64()


def summarise_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best metrics and totals of a run's rounds.parquet rows (in round order)."""
    def real(v) -> bool:
        return v is not None and not (isinstance(v, float) and np.isnan(v))

    last = rows[-1] if rows else {}
    accs = [(r["accuracy"], r["round"]) for r in rows if real(r.get("accuracy"))]
    best = max(accs) if accs else (None, None)
    devs = [r["deviation_rel"] for r in rows if real(r.get("deviation_rel"))]
    return {
        "rounds": len(rows),
        "final": {k: last.get(k) for k in ("accuracy", "loss", "perplexity", "exact_match", "macro_f1", "mcc",
                                           "pearson", "spearman", "personalized_accuracy", "deviation_rel")},
        "best": {"accuracy": best[0], "round": best[1]},
        "last_evaluated": {"accuracy": accs[-1][0] if accs else None, "round": accs[-1][1] if accs else None},
        "totals": {k: int(sum(r[k] or 0 for r in rows))
                   for k in ("bytes_up", "bytes_down", "clients_completed", "clients_failed")},
        "max_deviation_rel": max(devs) if devs else None,
        "wall_s": last.get("wall_s"),
    }


class PartitionedTable:
    """A Parquet dataset directory with one file per round; the schema only ever grows."""

    def __init__(self, storage: RunStorage, rel: str, schema: pa.Schema):
        self.storage = storage
        self.rel = rel
        self.schema = schema

    def part(self, rnd: int) -> str:
        return f"{self.rel}/round-{rnd:06d}.parquet"

    def parts(self) -> list[str]:
        """The round files, in round order."""
        names = [n for n in self.storage.listdir(self.rel) if n.startswith("round-") and n.endswith(".parquet")]
        return [f"{self.rel}/{n}" for n in sorted(names, key=_part_round)]

    def write(self, rnd: int, rows: list[dict[str, Any]]) -> None:
        table = _table(rows, self.schema)
        if not set(table.schema.names) <= set(self.schema.names):
            self._widen(table.schema)
        self.storage.write_parquet(self.part(rnd), _table(rows, self.schema))

    def _widen(self, schema: pa.Schema) -> None:
        """A column seen for the first time (e.g. an aggregator statistic): rewrite earlier parts with it."""
        extra = [f for f in schema if f.name not in self.schema.names]
        self.schema = pa.schema(list(self.schema) + extra)
        for part in self.parts():
            self.storage.write_parquet(part, _table(self.storage.read_parquet(part).to_pylist(), self.schema))

    def rows(self) -> list[dict[str, Any]]:
        parts = self.parts()
        if not parts:
            return []
        schema = pq.read_schema(self.storage.path(parts[-1]), filesystem=self.storage.fs)   # the widest
        return self.storage.read_parquet(self.rel, schema=schema).to_pylist()

    def drop_after(self, rnd: int) -> None:
        """Resume: forget the rounds after the checkpoint."""
        for part in self.parts():
            if _part_round(part) > rnd:
                self.storage.delete(part)
        parts = self.parts()
        if parts:
            self.schema = pq.read_schema(self.storage.path(parts[-1]), filesystem=self.storage.fs)


def _part_round(name: str) -> int:
    return int(name.rsplit("/", 1)[-1].split("-")[1].split(".")[0])


class RunWriter:
    """Writes one run directory (`run_dir`: a local path, a filesystem URI or a RunStorage)."""

    def __init__(self, run_dir: "RunStorage | str | os.PathLike"):
        self.storage = RunStorage.of(run_dir)
        self.storage.makedirs()
        self.rounds_table = PartitionedTable(self.storage, "rounds.parquet", ROUND_SCHEMA)
        self.clients_table = PartitionedTable(self.storage, "clients.parquet", CLIENT_SCHEMA)
        self.groups_table = PartitionedTable(self.storage, "groups.parquet", GROUP_SCHEMA)
        self.modules_table = PartitionedTable(self.storage, "modules.parquet", MODULE_SCHEMA)
        self.rounds: list[dict[str, Any]] = []

    @property
    def dir(self) -> str:
        """The run directory as the user would write it (a local path or a URI)."""
        return self.storage.uri()

    def write_config(self, cfg_dict: dict[str, Any]) -> None:
        self.storage.write_text("config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))

    def load_existing(self, up_to_round: int) -> None:
        """On resume: keep the rows of rounds already done (up to the checkpoint), drop the rest."""
        for table in (self.rounds_table, self.clients_table, self.groups_table, self.modules_table):
            table.drop_after(up_to_round)
        self.rounds = sorted(self.rounds_table.rows(), key=lambda r: r["round"])

    def add_round(self, row: dict[str, Any], clients: list[dict[str, Any]], groups: list[dict[str, Any]] = (),
                  modules: list[dict[str, Any]] = ()) -> None:
        self.rounds.append(row)
        self.clients_table.write(row["round"], clients)
        if groups:
            self.groups_table.write(row["round"], list(groups))
        if modules:
            self.modules_table.write(row["round"], list(modules))
        self.rounds_table.write(row["round"], [row])

    def write_updates(self, rnd: int, uploads: dict[int, tuple[dict, dict]], global_tensors: dict) -> None:
        from safetensors.numpy import save

        rnd_dir = f"updates/round-{rnd:04d}"
        for cid, (tensors, meta) in uploads.items():
            self.storage.write_bytes(f"{rnd_dir}/client-{cid}.safetensors", save(tensors, metadata=meta))
        scales = sorted({meta.get("scale") for _, meta in uploads.values()} or {""})
        meta = {"scale": scales[0] if len(scales) == 1 else json.dumps(scales)}
        self.storage.write_bytes(f"{rnd_dir}/global.safetensors", save(global_tensors, metadata=meta))

    def write_adapter(self, files: dict[str, bytes], base_delta: dict[str, np.ndarray] | None) -> None:
        from safetensors.numpy import save

        for name, data in files.items():
            self.storage.write_bytes(f"adapter/{name}", data)
        if base_delta is not None:
            tensors = {f"{k}.base_delta": np.ascontiguousarray(v) for k, v in base_delta.items()}
            self.storage.write_bytes("adapter/base_delta.safetensors", save(tensors))

    def write_summary(self, cfg_dict: dict[str, Any], extra: dict[str, Any],
                      status: str = "completed") -> dict[str, Any]:
        """summary.json (status: completed, failed or running; a key `status` in `extra` wins)."""
        from importlib.metadata import version

        summary = {
            "status": status,
            "name": cfg_dict["name"],
            "seed": cfg_dict["seed"],
            "aggregator": cfg_dict["aggregator"]["name"],
            **summarise_rounds(self.rounds),
            "resources": cfg_dict["resources"],
            "versions": {"python": platform.python_version(),
                         **{pkg: version(pkg) for pkg in ("ray", "torch", "transformers", "peft", "raysim")}},
            **extra,
        }
        if summary["status"] not in SUMMARY_STATUSES:
            raise ValueError(f"summary status {summary['status']!r}: one of {', '.join(SUMMARY_STATUSES)}")
        self.storage.write_text("summary.json", json.dumps(summary, indent=2, default=float))
        return summary


def read_rounds(run_dir: "RunStorage | str | os.PathLike") -> list[dict[str, Any]]:
    """The rows of a run directory's rounds.parquet (local path or URI), in round order; [] when none."""
    table = PartitionedTable(RunStorage.of(run_dir), "rounds.parquet", ROUND_SCHEMA)
    return sorted(table.rows(), key=lambda r: r["round"])
