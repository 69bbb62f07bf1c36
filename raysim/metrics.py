"""Run directory writer: config.yaml, rounds.parquet, clients.parquet, summary.json, updates/.

Parquet files are rewritten after every round (they are small), so a crashed run keeps its metrics;
`summary.json` is written last and only for a finished run, with `"status": "completed"` — a run
directory without it is not complete.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROUND_SCHEMA = pa.schema([
    ("round", pa.int64()), ("wall_s", pa.float64()), ("round_time_s", pa.float64()),
    ("accuracy", pa.float64()), ("loss", pa.float64()), ("personalized_accuracy", pa.float64()),
    ("deviation_rel", pa.float64()), ("deviation_rel_round", pa.float64()),
    ("bytes_up", pa.int64()), ("bytes_down", pa.int64()),
    ("clients_sampled", pa.int64()), ("clients_completed", pa.int64()), ("clients_failed", pa.int64()),
    ("train_loss", pa.float64()), ("aggregator", pa.string()),
])

CLIENT_SCHEMA = pa.schema([
    ("round", pa.int64()), ("client_id", pa.int64()), ("worker", pa.int64()), ("rank", pa.int64()),
    ("num_samples", pa.int64()), ("train_loss", pa.float64()), ("train_time_s", pa.float64()),
    ("bytes_up", pa.int64()), ("local_accuracy", pa.float64()), ("status", pa.string()),
    ("noisy", pa.bool_()),
])


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


class RunWriter:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []

    def write_config(self, cfg_dict: dict[str, Any]) -> None:
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))

    def load_existing(self, up_to_round: int) -> None:
        """On resume: keep the rows of rounds already done (up to the checkpoint)."""
        for name, target in (("rounds.parquet", self.rounds), ("clients.parquet", self.clients)):
            path = self.dir / name
            if path.exists():
                target.extend(r for r in pq.read_table(path).to_pylist() if r["round"] <= up_to_round)

    def add_round(self, out) -> None:
        self.rounds.append(out.row)
        self.clients.extend(out.clients)
        pq.write_table(_table(self.rounds, ROUND_SCHEMA), self.dir / "rounds.parquet")
        pq.write_table(_table(self.clients, CLIENT_SCHEMA), self.dir / "clients.parquet")
        if out.global_tensors is not None:
            self._write_updates(out)

    def _write_updates(self, out) -> None:
        from safetensors.numpy import save_file

        rnd_dir = self.dir / "updates" / f"round-{out.row['round']:04d}"
        rnd_dir.mkdir(parents=True, exist_ok=True)
        for cid, tensors in out.uploads.items():
            save_file(tensors, str(rnd_dir / f"client-{cid}.safetensors"), metadata=out.upload_meta[cid])
        scales = sorted({m.get("scale") for m in out.upload_meta.values()} or {""})
        save_file(out.global_tensors, str(rnd_dir / "global.safetensors"),
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

        accs = [(r["accuracy"], r["round"]) for r in self.rounds if r["accuracy"] is not None
                and not np.isnan(r["accuracy"])]
        last = self.rounds[-1] if self.rounds else {}
        best = max(accs) if accs else (None, None)
        devs = [r["deviation_rel"] for r in self.rounds if r.get("deviation_rel") is not None]
        summary = {
            "status": "completed",
            "name": cfg_dict["name"],
            "seed": cfg_dict["seed"],
            "aggregator": cfg_dict["aggregator"]["name"],
            "rounds": len(self.rounds),
            "final": {k: last.get(k) for k in ("accuracy", "loss", "personalized_accuracy", "deviation_rel")},
            "best": {"accuracy": best[0], "round": best[1]},
            "totals": {"bytes_up": int(sum(r["bytes_up"] for r in self.rounds)),
                       "bytes_down": int(sum(r["bytes_down"] for r in self.rounds)),
                       "clients_completed": int(sum(r["clients_completed"] for r in self.rounds)),
                       "clients_failed": int(sum(r["clients_failed"] for r in self.rounds))},
            "max_deviation_rel": max(devs) if devs else None,
            "wall_s": last.get("wall_s"),
            "resources": cfg_dict["resources"],
            "versions": {"python": platform.python_version(),
                         **{pkg: version(pkg) for pkg in ("ray", "torch", "transformers", "peft", "raysim")}},
            **extra,
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        return summary
