"""Driver side of one simulation: validate and prepare data (no Ray), start or join Ray, drive the
Coordinator round by round, write the run directory. Used by `raysim run` and by Tune trials."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from raysim.config import ConfigError, ExperimentConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepare_data(cfg: ExperimentConfig):
    """Load the source and partition it; every data mistake is a ConfigError raised here, before Ray."""
    from raysim.data.federated import split_and_partition
    from raysim.data.sources import load_source
    from raysim.models import check_model_name

    try:
        check_model_name(cfg.model.name, cfg.model.max_length)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from raysim.ranks import check_ranks_fit

    check_ranks_fit(cfg)                                  # rank <= min(m, n), from the model's config
    raw = load_source(cfg.data, cfg.seed)
    test_idx, client_train, client_test = split_and_partition(raw, cfg)
    return raw, {"test_idx": test_idx, "client_train": client_train, "client_test": client_test}


def start_ray(address: str | None, cfg: ExperimentConfig, verbose: bool = False) -> bool:
    """Join or start Ray (RAY_NOTES.md §6): explicit address, else RAY_ADDRESS (inside a job), else a
    private local instance. Returns True if this call started Ray (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        need = cfg.resources.num_workers * cfg.resources.cpus_per_worker
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 include_dashboard=False, **quiet)
    return True


def resolve_gpus(cfg: ExperimentConfig) -> float:
    """GPU share per worker: 'auto' = 1/num_workers of the visible GPUs (0 without GPUs). A GPU request
    the cluster cannot satisfy is an error, never an actor pending forever."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    want = cfg.resources.gpus_per_worker
    if want == "auto":
        return 0.0 if have <= 0 else min(1.0, have / cfg.resources.num_workers)
    if want * cfg.resources.num_workers > have + 1e-9:
        raise ConfigError(f"resources.gpus_per_worker: {want} × {cfg.resources.num_workers} workers needs "
                          f"{want * cfg.resources.num_workers:g} GPUs but the Ray cluster has {have:g}; "
                          "use gpus_per_worker: auto or 0")
    return float(want)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_experiment(cfg: ExperimentConfig, run_dir: Path, *, address: str | None = None, verbose: bool = False,
                   resume: bool = False, progress: bool = True,
                   on_round: Callable[[dict[str, Any], Any], None] | None = None,
                   prepared=None) -> dict[str, Any]:
    """Run (or resume) one simulation into `run_dir`; returns the summary dict.

    on_round(row, checkpoint_dir) is called after each round is written (Tune reports through it).
    """
    import ray

    from raysim.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from raysim.coordinator import Coordinator
    from raysim.metrics import RunWriter

    t_start = time.time()
    raw, partition = prepared if prepared is not None else prepare_data(cfg)
    writer = RunWriter(run_dir)
    cfg_dict = cfg.to_yaml_dict()
    first_round = 1
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume:
        writer.write_config(cfg_dict)
    started_ray = start_ray(address, cfg, verbose)
    coordinator = None
    try:
        gpus = resolve_gpus(cfg)
        coordinator = Coordinator.remote(cfg_dict, raw, partition, gpus)
        if ckpt is not None:
            tensors, meta = load_checkpoint(ckpt)
            done = ray.get(coordinator.load_state_dict.remote(tensors, meta), timeout=600)
            writer.load_existing(done)
            first_round = done + 1
        setup_s = time.time() - t_start
        deadline = cfg.federation.round_timeout_s * 2 + 600
        with _progress(progress, cfg, first_round) as bar:
            for rnd in range(first_round, cfg.federation.rounds + 1):
                out = ray.get(coordinator.run_round.remote(rnd), timeout=deadline)
                writer.add_round(out)
                ckpt_dir = save_checkpoint(run_dir, *out.checkpoint) if out.checkpoint else None
                bar(out.row)
                if on_round is not None:
                    on_round(out.row, ckpt_dir)
        files, base_delta = ray.get(coordinator.final_adapter.remote(_base_name(cfg)), timeout=600)
        writer.write_adapter(files, base_delta)
        return writer.write_summary(cfg_dict, {"setup_s": setup_s, "total_s": time.time() - t_start,
                                               "gpus_per_worker": gpus, "run_dir": str(run_dir)})
    finally:
        if coordinator is not None:
            try:
                ray.get(coordinator.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - teardown must not mask the real error
                pass
            ray.kill(coordinator)
        if started_ray:
            ray.shutdown()


def _base_name(cfg: ExperimentConfig) -> str:
    from raysim.models import model_path

    return cfg.model.name if cfg.model.name.startswith("random:") else model_path(cfg.model.name)


class _progress:
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
            self.bar.update(self.task, advance=1, acc=fmt(row["accuracy"], ".3f"), loss=fmt(row["loss"], ".3f"),
                            dev=fmt(row["deviation_rel"], ".1e"))
        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
