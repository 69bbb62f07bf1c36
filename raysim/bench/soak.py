"""`--workload soak`: a long run under constant faults — 200 rounds of 1,000 synthetic clients with a worker
killed every 7 rounds while clients train, 5 % of the clients dropping out and 5 % uploading corrupt
(NaN) updates. Checks that nothing is lost (every round
and every sampled client recorded with a status, the run completed, the adapter written) and that the
memory of the driver and the coordinator stays flat (resident memory sampled every round)."""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SOAK_CONFIG: dict[str, Any] = {
    "name": "bench-soak", "seed": 0,
    "model": {"name": "random:bert-tiny", "max_length": 32},
    "data": {"source": "synthetic:text-cls", "test_fraction": 0.1, "local_test_fraction": 0.0,
             "synthetic": {"num_examples": 20000, "seq_len": 32, "vocab_size": 1000, "num_labels": 4},
             "partition": {"scheme": "iid", "min_samples": 4}},
    "federation": {"num_clients": 1000, "clients_per_round": 10, "rounds": 200, "round_timeout_s": 120,
                   "max_update_norm": 1000.0},
    "train": {"local_steps": 2, "batch_size": 16, "lr": 5.0e-4},
    "lora": {"rank": 4, "alpha": 8, "target_modules": ["query", "value"]},
    "aggregator": {"name": "fedit"},
    "resources": {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0},
    "eval": {"every": 10},
    "faults": {"drop_rate": 0.05, "corrupt_rate": 0.05, "corrupt_kind": "nan", "kill_worker_every": 7},
    "output": {"checkpoint_every": 10},
}


def _rss_mib(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def _coordinator_pid() -> int | None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if " ".join(child.cmdline()[:1]).startswith("ray::CoordinatorImpl"):
                return child.pid
        except psutil.Error:
            continue
    return None


def run_soak(rounds: int | None = None, clients: int | None = None, log=print) -> dict[str, Any]:
    """Run the soak workload once; returns what was lost (nothing, if it works) and the memory series."""
    import os

    import pandas as pd

    from raysim.config import validate_config
    from raysim.runner import run_experiment

    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in SOAK_CONFIG.items()}
    raw["federation"]["rounds"] = rounds or raw["federation"]["rounds"]
    raw["federation"]["num_clients"] = clients or raw["federation"]["num_clients"]
    cfg = validate_config(raw)
    memory: list[dict[str, float | None]] = []
    coord = {"pid": None}

    def sample(row, ckpt) -> None:
        coord["pid"] = coord["pid"] or _coordinator_pid()
        memory.append({"round": row["round"], "driver_mib": _rss_mib(os.getpid()),
                       "coordinator_mib": _rss_mib(coord["pid"]) if coord["pid"] else None})
        if row["round"] % 20 == 0:
            log(f"[soak] round {row['round']}: driver {memory[-1]['driver_mib']:.0f} MiB, workers {row['workers']}")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysim-soak-") as d:
        run_dir = Path(d) / "run"
        summary = run_experiment(cfg, run_dir, progress=False, on_round=sample)
        rows = pd.read_parquet(run_dir / "rounds.parquet")
        clients_df = pd.read_parquet(run_dir / "clients.parquet")
        adapter = (run_dir / "adapter" / "adapter_model.safetensors").exists()
    return _result(cfg, summary, rows, clients_df, adapter, memory, time.perf_counter() - t0)


def _growth(series: list[float | None]) -> float | None:
    """Median of the last fifth over the median of the second fifth (after warm-up): 1.0 = flat."""
    values = [v for v in series if v is not None]
    if len(values) < 10:
        return None
    n = len(values) // 5
    return statistics.median(values[-n:]) / statistics.median(values[n:2 * n])


def _result(cfg, summary, rows, clients_df, adapter: bool, memory, total_s: float) -> dict[str, Any]:
    from raysim.bench.machine import machine_info

    sampled = int(rows["clients_sampled"].sum())
    lost = {
        "rounds_missing": cfg.federation.rounds - len(rows),
        "client_rows_missing": sampled - len(clients_df),
        "rounds_unbalanced": int((rows["clients_completed"] + rows["clients_failed"] != rows["clients_sampled"]).sum()),
        "failures_without_reason": int(clients_df[(clients_df["status"] != "ok") & clients_df["error"].isna()].shape[0]),
        "adapter_missing": not adapter,
    }
    growth = {k: _growth([m[k] for m in memory]) for k in ("driver_mib", "coordinator_mib")}
    out = {"workload": "soak", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(), "num_clients": cfg.federation.num_clients,
           "clients_per_round": cfg.federation.clients_per_round, "rounds": len(rows), "total_s": total_s,
           "status": summary.get("status"), "workers_killed": cfg.federation.rounds // cfg.faults.kill_worker_every,
           "client_status": clients_df["status"].value_counts().to_dict(), "lost": lost,
           "memory_growth": growth, "memory": memory}
    out["targets"] = {"nothing_lost": summary.get("status") == "completed" and not any(lost.values()),
                      "memory_flat_within_10pct": all(g is not None and g <= 1.10 for g in growth.values())}
    return out
