"""The driver's round loop: ask the coordinator for round r+1, then complete and write round r.

`PhaseClock` times the run's phases; `drive_rounds` keeps the coordinator one round ahead (pipelining); `Recorder` waits for a round's pending
evaluation, personalised evaluation and deviation metric, writes its rows, wire dump and checkpoint, and
updates the progress bar; `progress_bar` is that bar (round k/N, accuracy, loss, deviation, ETA).
"""

from __future__ import annotations

import time
from typing import Any

from raysim.config import ExperimentConfig
from raysim.metrics import RunWriter


class PhaseClock:
    """Wall seconds of the start-up and teardown phases, and the driver's CPU seconds."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.cpu0 = time.process_time()
        self.phases: dict[str, float] = {}

    def lap(self, name: str | None) -> None:
        """End the current phase (`None`: time that belongs to no start-up phase)."""
        now = time.perf_counter()
        if name is not None:
            self.phases[name] = self.phases.get(name, 0.0) + (now - self.last)
        self.last = now

    def mark(self, name: str) -> None:
        """Record the wall seconds since the start under `name`."""
        self.phases[name] = time.perf_counter() - self.t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self) -> dict[str, float]:
        keys = ("ray_init_s", "data_s", "workers_ready_s", "startup_s", "first_round_s", "teardown_s")
        return {**{k: round(self.phases.get(k, 0.0), 4) for k in keys},
                "cpu_s": round(time.process_time() - self.cpu0, 4), "total_s": round(self.elapsed(), 4)}


def drive_rounds(coordinator, recorder: "Recorder", first_round: int, cfg: ExperimentConfig,
                 clock: PhaseClock) -> str | None:
    """Pipelined: ask for round r+1 before recording round r, so recording never delays training. Returns why
    the run failed (more degraded rounds than federation.max_degraded_rounds), or None."""
    import ray

    last = cfg.federation.rounds
    deadline = cfg.federation.round_timeout_s * 2 + 600
    clock.mark("startup_s")                           # wall seconds until the first round is dispatched
    ref = coordinator.run_round.remote(first_round) if first_round <= last else None
    for rnd in range(first_round, last + 1):
        out = ray.get(ref, timeout=deadline)
        if rnd == first_round:
            clock.lap("first_round_s")
        if rnd < last:
            ref = coordinator.run_round.remote(rnd + 1)
        recorder.record(out, cfg.federation.round_timeout_s)
        limit = cfg.federation.max_degraded_rounds
        if limit is not None and recorder.degraded > limit:
            clock.lap(None)
            return (f"{recorder.degraded} degraded rounds (fewer than federation.min_completed_fraction "
                    f"{cfg.federation.min_completed_fraction} of the sampled clients aggregated) exceed "
                    f"federation.max_degraded_rounds {limit}; stopped after round {rnd}")
    clock.lap(None)
    return None


class Recorder:
    """Completes and writes one round: waits for its evaluation and deviation metric, then writes the rows,
    the wire dump and the checkpoint, updates the progress bar and calls `on_round`."""

    def __init__(self, coordinator, writer: RunWriter, run_dir, bar, on_round, logged: tuple[str, ...],
                 cfg_hash: str | None = None):
        self.coordinator = coordinator
        self.logged = logged                       # the metric columns this run fills
        self.writer = writer
        self.run_dir = run_dir
        self.cfg_hash = cfg_hash                   # stored in every checkpoint; --resume checks it
        self.bar = bar
        self.on_round = on_round
        self.degraded = sum(r.get("status") == "degraded" for r in writer.rounds)     # incl. resumed rounds

    def record(self, out, timeout_s: float) -> None:
        from raysim.checkpoint import save_checkpoint

        groups, modules = self._resolve(out, timeout_s)
        rnd = out.row["round"]
        self.degraded += out.row["status"] == "degraded"
        self.writer.add_round(out.row, out.clients, groups, modules)
        if out.global_tensors is not None:
            self.writer.write_updates(rnd, out.uploads, out.global_tensors)
        ckpt_dir = save_checkpoint(self.run_dir, *out.checkpoint, config_hash=self.cfg_hash) if out.checkpoint else None
        self.bar(out.row)
        if self.on_round is not None:
            self.on_round(out.row, ckpt_dir)

    def _resolve(self, out, timeout_s: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Fill the row's pending metrics; returns the groups.parquet rows of this round's evaluation and the
        modules.parquet rows of its deviation metric."""
        import ray

        from raysim.metrics import group_rows

        pending, row, groups, modules = out.pending, out.row, [], []
        if pending.evaluation:
            total = self._evaluation(row["round"], pending.evaluation, timeout_s)
            metrics = total.metrics()
            row.update({k: metrics[k] for k in self.logged})
            groups = group_rows(row["round"], total, out.group_names)
        if pending.deviation is not None:
            row["deviation_rel"], row["deviation_rel_round"], modules = ray.get(pending.deviation, timeout=timeout_s)
            modules = [{"round": row["round"], **m} for m in modules]
        if pending.personal:
            self._personal(out, timeout_s)
        return groups, modules

    def _personal(self, out, timeout_s: float) -> None:
        """Personalised evaluation: the row's summary and each evaluated client's local accuracy and loss."""
        import ray
        from ray.exceptions import RayActorError

        from raysim.records import personal_summary

        rnd = out.row["round"]
        refs = out.pending.personal
        try:
            _, missing = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            pairs = None if missing else [pair for part in ray.get(refs) for pair in part]
        except RayActorError:
            pairs = None
        if pairs is None:                               # a worker was lost or hangs: evaluated again
            pairs = ray.get(self.coordinator.reevaluate_personal.remote(rnd), timeout=timeout_s * 3 + 600)
        results = dict(pairs)
        out.row.update(personal_summary(results, out.pending.personal_weights))
        for client in out.clients:
            if client["client_id"] in results:
                client["local_accuracy"] = results[client["client_id"]].accuracy
                client["local_loss"] = results[client["client_id"]].loss

    def _evaluation(self, rnd: int, refs: list, timeout_s: float):
        """The summed evaluation shards; if a worker holding one was lost, the coordinator evaluates again."""
        import ray
        from ray.exceptions import RayActorError

        from raysim.engines.base import EvalResult

        ready, missing = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        try:
            if not missing:
                return EvalResult.total(ray.get(refs))
        except RayActorError:
            pass
        # a worker holding a shard was lost or hangs: the coordinator replaces it and evaluates again
        return ray.get(self.coordinator.reevaluate.remote(rnd), timeout=timeout_s * 3 + 600)


class progress_bar:
    """A rich progress bar: round k/N, accuracy, loss, ETA. Silent when disabled."""

    def __init__(self, enabled: bool, cfg: ExperimentConfig, first_round: int):
        self.enabled = enabled
        self.cfg = cfg
        self.first_round = first_round

    def __enter__(self):
        if not self.enabled:
            return lambda row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("acc {task.fields[acc]}  loss {task.fields[loss]}  dev {task.fields[dev]}"),
                            TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task(f"{self.cfg.name} rounds", total=self.cfg.federation.rounds,
                                      completed=self.first_round - 1, acc="-", loss="-", dev="-")

        def update(row):
            fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731
            acc = row["accuracy"] if row.get("accuracy") is not None else row.get("exact_match")
            self.bar.update(self.task, advance=1, acc=fmt(acc, ".3f"), loss=fmt(row["loss"], ".3f"),
                            dev=fmt(row["deviation_rel"], ".1e"))
        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
