"""`--workload scale-10k`: 10,000 virtual clients (100 per round) on synthetic data; peak resident
memory of the driver, the coordinator actor and the workers."""

from __future__ import annotations

import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raysim.bench.workloads import scale_config


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a process, MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ActorMemoryWatch:
    """Polls this driver's descendants (i.e. this Ray instance's processes) every half second and keeps
    the peak RSS of each coordinator and worker actor process, keyed 'role:pid'."""

    ROLES = {"ray::CoordinatorImpl": "coordinator", "ray::ClientWorkerImpl": "worker"}

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.driver_peak = 0.0                     # this process's own resident set, MiB, peak while watching
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "ActorMemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.5):
            try:
                self.driver_peak = max(self.driver_peak, me.memory_info().rss / 2**20)
                for child in me.children(recursive=True):
                    name = " ".join(child.cmdline()[:1])
                    role = next((r for prefix, r in self.ROLES.items() if name.startswith(prefix)), None)
                    if role:
                        key = f"{role}:{child.pid}"
                        self.peaks[key] = max(self.peaks.get(key, 0.0), peak_rss_mib(child.pid) or 0.0)
            except (psutil.Error, OSError):
                continue

    def role_peaks(self, role: str) -> list[float]:
        return [v for k, v in self.peaks.items() if k.startswith(role + ":")]


def run_scale(engine: str = "cohort", rounds: int | None = None, clients: int | None = None,
              log=print) -> dict[str, Any]:
    """Run the scale workload once and report round times and peak memory."""
    import pyarrow.parquet as pq

    from raysim.config import validate_config
    from raysim.runner import prepare_data, run_experiment

    raw = scale_config()
    raw["resources"]["engine"] = engine
    if rounds:
        raw["federation"]["rounds"] = rounds
    if clients:
        raw["federation"]["num_clients"] = clients
    cfg = validate_config(raw)
    t0 = time.perf_counter()
    with ActorMemoryWatch() as watch, tempfile.TemporaryDirectory(prefix="raysim-scale-") as d:
        prepared = prepare_data(cfg)
        log(f"[bench] scale: {cfg.federation.num_clients} clients prepared in {time.perf_counter() - t0:.1f} s")
        summary = run_experiment(cfg, Path(d) / "run", progress=False, prepared=prepared)
        rows = pq.read_table(Path(d) / "run" / "rounds.parquet").to_pylist()
    out = _scale_result(cfg, engine, rows, watch, time.perf_counter() - t0, summary.get("status"))
    rss = out["peak_rss_mib"]
    coord = rss["coordinator"]
    log(f"[bench] scale: {len(rows)} rounds, peak RSS driver {rss['driver']:.0f} MiB, coordinator "
        f"{coord if coord is not None else float('nan'):.0f} MiB, workers ≤ {rss['workers_max']} MiB")
    return out


def _scale_result(cfg, engine: str, rows: list[dict], watch: ActorMemoryWatch, total_s: float,
                  status: str | None) -> dict[str, Any]:
    import resource

    from raysim.bench.machine import machine_info

    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    coord = max(watch.role_peaks("coordinator"), default=None)
    workers = watch.role_peaks("worker")
    out = {
        "workload": "scale-10k", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "engine": engine,
        "num_clients": cfg.federation.num_clients, "clients_per_round": cfg.federation.clients_per_round,
        "rounds": len(rows), "total_s": total_s,
        "round_times_s": [round(r["round_time_s"], 3) for r in rows],
        "clients_failed": sum(r["clients_failed"] for r in rows),
        "peak_rss_mib": {"driver": driver, "coordinator": coord,
                         "driver_plus_coordinator": driver + (coord or 0.0),
                         "workers_max": max(workers) if workers else None},
        "status": status,
    }
    out["targets"] = {"driver_plus_coordinator_rss_lt_2GiB": out["peak_rss_mib"]["driver_plus_coordinator"] < 2048}
    return out
