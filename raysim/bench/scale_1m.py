"""`--workload scale-1m`: a million registered clients of the per-client synthetic source, 1,000 per round,
20 rounds, once with FedIT (no per-client state) and once with FedSA-LoRA (a B matrix per client that has
trained, kept in the run's client-state store on disk). Per run: peak resident memory of the driver, the
coordinator and the largest worker; every round's time split into training (`dispatch_s`), aggregation
(`aggregate_s`) and the rest (the server's bookkeeping); the bytes of per-client state and checkpoints on disk."""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raysim.bench.scale import ActorMemoryWatch
from raysim.bench.workloads import scale_1m_config

METHODS = ("fedit", "fedsa")


def run_scale_1m(rounds: int | None = None, clients: int | None = None, per_round: int | None = None,
                 methods=METHODS, log=print) -> dict[str, Any]:
    """Run the workload once per method, one after another; the JSON's `runs` holds one entry per method."""
    from raysim.bench.machine import machine_info

    runs = [_run_one(m, rounds, clients, per_round, log) for m in methods]
    return {"workload": "scale-1m", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "runs": runs, "targets": targets(runs)}


def _run_one(aggregator: str, rounds: int | None, clients: int | None, per_round: int | None, log) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from raysim.config import validate_config
    from raysim.runner import prepare_data, run_experiment

    raw = scale_1m_config(aggregator)
    fed = raw["federation"]
    fed.update({k: v for k, v in (("rounds", rounds), ("num_clients", clients), ("clients_per_round", per_round)) if v})
    cfg = validate_config(raw)
    t0 = time.perf_counter()
    with ActorMemoryWatch() as watch, tempfile.TemporaryDirectory(prefix="raysim-scale-1m-") as d:
        run_dir = Path(d) / "run"
        prepared = prepare_data(cfg)
        log(f"[bench] scale-1m {aggregator}: {cfg.federation.num_clients:,} clients prepared in "
            f"{time.perf_counter() - t0:.1f} s")
        summary = run_experiment(cfg, run_dir, progress=False, prepared=prepared)
        rows = pq.read_table(run_dir / "rounds.parquet").to_pylist()
        disk = {"state_bytes_on_disk": _bytes_under(run_dir / "client_state"),
                "checkpoint_bytes_on_disk": _bytes_under(run_dir / "checkpoints")}
    out = _result(cfg, rows, watch, disk, summary.get("status"), time.perf_counter() - t0)
    log(f"[bench] scale-1m {aggregator}: {len(rows)} rounds, median round {statistics.median(out['round_time_s']):.2f} s, "
        f"bookkeeping ≤ {max(out['bookkeeping_s']):.3f} s, driver {out['peak_rss_mib']['driver']:.0f} MiB, "
        f"coordinator {out['peak_rss_mib']['coordinator'] or float('nan'):.0f} MiB, "
        f"state on disk {out['state_bytes_on_disk'] / 2**20:.1f} MiB")
    return out


def _result(cfg, rows: list[dict], watch: ActorMemoryWatch, disk: dict[str, int], status: str | None,
            total_s: float) -> dict[str, Any]:
    times = [r["round_time_s"] for r in rows]
    book = [r["round_time_s"] - (r["dispatch_s"] or 0.0) - (r["aggregate_s"] or 0.0) for r in rows]
    workers = watch.role_peaks("worker")
    return {
        "aggregator": cfg.aggregator.name, "num_clients": cfg.federation.num_clients,
        "clients_per_round": cfg.federation.clients_per_round, "rounds": len(rows), "status": status,
        "clients_failed": sum(r["clients_failed"] for r in rows), "total_s": round(total_s, 1),
        "peak_rss_mib": {"driver": watch.driver_peak, "coordinator": max(watch.role_peaks("coordinator"), default=None),
                         "worker_max": max(workers) if workers else None},
        "round_time_s": [round(t, 3) for t in times],
        "dispatch_s": [round(r["dispatch_s"] or 0.0, 3) for r in rows],
        "aggregate_s": [round(r["aggregate_s"] or 0.0, 4) for r in rows],
        "bookkeeping_s": [round(b, 4) for b in book],
        "round20_over_round3": times[19] / times[2] if len(times) >= 20 else None,
        **disk,
    }


def targets(runs: list[dict[str, Any]]) -> dict[str, bool | None]:
    """The acceptance targets, per method: driver + coordinator < 2 GiB; round 20 / round 3 ≤ 1.1; bookkeeping
    < 1 s every round; FedSA-LoRA's per-client state on disk."""
    out: dict[str, bool | None] = {}
    for run in runs:
        name, rss = run["aggregator"], run["peak_rss_mib"]
        out[f"{name}_driver_plus_coordinator_lt_2GiB"] = rss["driver"] + (rss["coordinator"] or 0.0) < 2048
        ratio = run["round20_over_round3"]
        out[f"{name}_round20_over_round3_le_1.1"] = None if ratio is None else ratio <= 1.1
        out[f"{name}_bookkeeping_lt_1s"] = max(run["bookkeeping_s"]) < 1.0
        if name == "fedsa":
            out["fedsa_state_on_disk"] = run["state_bytes_on_disk"] > 0
    return out


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
