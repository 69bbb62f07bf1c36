"""Run directory writer: config.yaml, rounds.parquet, clients.parquet, summary.json, updates/, adapter/.

`rounds.parquet` and `clients.parquet` are Parquet dataset directories with one file per round
(`round-NNNNNN.parquet`, written atomically), so recording a round costs the same in round 1 and round
10,000, and both stay readable during the run with `pandas.read_parquet(path)` or
`pyarrow.parquet.read_table(path)`. `summary.json` is written last and only for a finished run, with
`"status": "completed"` — a run directory without it is not complete.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROUND_SCHEMA = pa.schema([
    ("round", pa.int64()), ("wall_s", pa.float64()), ("round_time_s", pa.float64()),
    ("accuracy", pa.float64()), ("loss", pa.float64()), ("perplexity", pa.float64()),
    ("exact_match", pa.float64()), ("macro_f1", pa.float64()), ("mcc", pa.float64()), ("pearson", pa.float64()),
    ("spearman", pa.float64()), ("personalized_accuracy", pa.float64()), ("personalized_loss", pa.float64()),
    ("deviation_rel", pa.float64()), ("deviation_rel_round", pa.float64()),
    ("bytes_up", pa.int64()), ("bytes_down", pa.int64()),
    ("clients_sampled", pa.int64()), ("clients_completed", pa.int64()), ("clients_failed", pa.int64()),
    ("train_loss", pa.float64()), ("aggregator", pa.string()),
])

CLIENT_SCHEMA = pa.schema([
    ("round", pa.int64()), ("client_id", pa.int64()), ("worker", pa.int64()), ("rank", pa.int64()),
    ("num_samples", pa.int64()), ("train_loss", pa.float64()), ("train_time_s", pa.float64()),
    ("bytes_up", pa.int64()), ("local_accuracy", pa.float64()), ("local_loss", pa.float64()), ("status", pa.string()),
    ("noisy", pa.bool_()),
])


GROUP_SCHEMA = pa.schema([
    ("round", pa.int64()), ("group", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
    ("n", pa.int64()),
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
    """Rows -> table with the fixed columns first; extra numeric columns (e.g. agg_*) appended."""
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    fields = list(schema) + [pa.field(k, pa.float64()) for k in extra]
    full = pa.schema(fields)
    cols = {f.name: [r.get(f.name) for r in rows] for f in full}
    for f in full:
        if pa.types.is_floating(f.type):
            cols[f.name] = [None if v is None else float(v) for v in cols[f.name]]
    return pa.table(cols, schema=full)


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

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema

    def part(self, rnd: int) -> Path:
        return self.path / f"round-{rnd:06d}.parquet"

    def write(self, rnd: int, rows: list[dict[str, Any]]) -> None:
        table = _table(rows, self.schema)
        if not set(table.schema.names) <= set(self.schema.names):
            self._widen(table.schema)
        self._write_file(self.part(rnd), _table(rows, self.schema))

    def _widen(self, schema: pa.Schema) -> None:
        """A column seen for the first time (e.g. an aggregator statistic): rewrite earlier parts with it."""
        extra = [f for f in schema if f.name not in self.schema.names]
        self.schema = pa.schema(list(self.schema) + extra)
        for part in sorted(self.path.glob("round-*.parquet")):
            self._write_file(part, _table(pq.read_table(part).to_pylist(), self.schema))

    def _write_file(self, target: Path, table: pa.Table) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{target.name}.tmp"           # hidden: readers skip it
        pq.write_table(table, tmp)
        os.replace(tmp, target)

    def rows(self) -> list[dict[str, Any]]:
        if not any(self.path.glob("round-*.parquet")):
            return []
        return pq.read_table(self.path).to_pylist()

    def drop_after(self, rnd: int) -> None:
        """Resume: forget the rounds after the checkpoint."""
        for part in self.path.glob("round-*.parquet"):
            if int(part.stem.split("-")[1]) > rnd:
                part.unlink()
        parts = sorted(self.path.glob("round-*.parquet"))
        if parts:
            self.schema = pq.read_schema(parts[-1])


class RunWriter:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rounds_table = PartitionedTable(self.dir / "rounds.parquet", ROUND_SCHEMA)
        self.clients_table = PartitionedTable(self.dir / "clients.parquet", CLIENT_SCHEMA)
        self.groups_table = PartitionedTable(self.dir / "groups.parquet", GROUP_SCHEMA)
        self.rounds: list[dict[str, Any]] = []

    def write_config(self, cfg_dict: dict[str, Any]) -> None:
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))

    def load_existing(self, up_to_round: int) -> None:
        """On resume: keep the rows of rounds already done (up to the checkpoint), drop the rest."""
        for table in (self.rounds_table, self.clients_table, self.groups_table):
            table.drop_after(up_to_round)
        self.rounds = sorted(self.rounds_table.rows(), key=lambda r: r["round"])

    def add_round(self, row: dict[str, Any], clients: list[dict[str, Any]], groups: list[dict[str, Any]] = ()) -> None:
        self.rounds.append(row)
        self.clients_table.write(row["round"], clients)
        if groups:
            self.groups_table.write(row["round"], list(groups))
        self.rounds_table.write(row["round"], [row])

    def write_updates(self, rnd: int, uploads: dict[int, tuple[dict, dict]], global_tensors: dict) -> None:
        from safetensors.numpy import save_file

        rnd_dir = self.dir / "updates" / f"round-{rnd:04d}"
        rnd_dir.mkdir(parents=True, exist_ok=True)
        for cid, (tensors, meta) in uploads.items():
            save_file(tensors, str(rnd_dir / f"client-{cid}.safetensors"), metadata=meta)
        scales = sorted({meta.get("scale") for _, meta in uploads.values()} or {""})
        save_file(global_tensors, str(rnd_dir / "global.safetensors"),
                  metadata={"scale": scales[0] if len(scales) == 1 else json.dumps(scales)})

    def write_adapter(self, files: dict[str, bytes], base_delta: dict[str, np.ndarray] | None) -> None:
        from safetensors.numpy import save_file

        adapter = self.dir / "adapter"
        adapter.mkdir(exist_ok=True)
        for name, data in files.items():
            (adapter / name).write_bytes(data)
        if base_delta is not None:
            save_file({f"{k}.base_delta": np.ascontiguousarray(v) for k, v in base_delta.items()},
                      str(adapter / "base_delta.safetensors"))

    def write_summary(self, cfg_dict: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        from importlib.metadata import version

        summary = {
            "status": "completed",
            "name": cfg_dict["name"],
            "seed": cfg_dict["seed"],
            "aggregator": cfg_dict["aggregator"]["name"],
            **summarise_rounds(self.rounds),
            "resources": cfg_dict["resources"],
            "versions": {"python": platform.python_version(),
                         **{pkg: version(pkg) for pkg in ("ray", "torch", "transformers", "peft", "raysim")}},
            **extra,
        }
        tmp = self.dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        os.replace(tmp, self.dir / "summary.json")
        return summary
