"""Driver side of one simulation. Used by `raysim run` and by Tune trials.

1. Validate and prepare the data (no Ray yet: every user mistake is a ConfigError here).
2. Start Ray lean (or join a cluster) and create the workers at once, so they import torch and build
   their models while the coordinator starts and tokenises the data.
3. Drive the rounds pipelined: round r+1 is requested before round r is recorded, so the coordinator
   trains the next round while the driver writes metrics, checkpoints and progress (raysim.recorder).
The driver never imports torch, transformers or peft.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from raysim.config import ConfigError, ExperimentConfig
from raysim.metrics import RunWriter
from raysim.recorder import PhaseClock, Recorder, drive_rounds, progress_bar
from raysim.storage import RunStorage, refuse_node_local

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")          # no usage-stats reporting thread
os.environ.setdefault("RAY_enable_metrics_collection", "0")     # no metrics export from a local Ray


def prepare_data(cfg: ExperimentConfig):
    """Load the source and partition it; every data mistake is a ConfigError raised here, before Ray."""
    import numpy as np

    from raysim.data.federated import split_and_partition
    from raysim.data.per_client import is_per_client, open_per_client
    from raysim.data.sources import load_source
    from raysim.lora.targets import check_target_modules
    from raysim.models import architecture, check_model_name, modules_to_save, target_modules

    try:
        check_model_name(cfg.model.name, cfg.model.max_length, task=cfg.task.type)
        check_target_modules(target_modules(cfg), architecture(cfg.model.name))   # named, or the default
        modules_to_save(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from raysim.ranks import check_ranks_fit

    check_ranks_fit(cfg)                                  # rank <= min(m, n), from the model's config
    _check_task_keys(cfg)
    per_client = open_per_client(cfg) if is_per_client(cfg.data) else None
    # per-client data: only the global test set (the held-out clients' examples) is loaded here
    raw = load_source(cfg.data, cfg.seed, task=cfg.task.type) if per_client is None else per_client.test_set()
    _check_texts(cfg, raw)
    _check_prompts_fit(cfg, raw)
    if cfg.eval.group_by and cfg.eval.group_by not in raw.columns:
        raise ConfigError(f"eval.group_by: column {cfg.eval.group_by!r} not found; columns: "
                          f"{', '.join(sorted(raw.columns)) or '(none besides the text and the label)'}")
    if per_client is not None:
        return raw, {"test_idx": np.arange(len(raw), dtype=np.int64), "per_client": per_client}
    test_idx, client_train, client_test = split_and_partition(raw, cfg)
    return raw, {"test_idx": test_idx, "client_train": client_train, "client_test": client_test}


def _check_texts(cfg: ExperimentConfig, raw) -> None:
    """A text column with nothing in it would train on empty strings: refuse it, naming the column."""
    columns = [("data.text_column", cfg.data.text_column, raw.texts)]
    if raw.text_pairs is not None:
        columns.append(("data.text_pair_column", cfg.data.text_pair_column, raw.text_pairs))
    for key, column, texts in columns:
        if texts is not None and len(texts) and not any(str(t).strip() for t in texts):
            raise ConfigError(f"{key}: every value of column {column!r} is empty ({len(texts)} rows); "
                              f"point {key} at the column that holds the text")


def _check_prompts_fit(cfg: ExperimentConfig, raw) -> None:
    """causal_lm with a random decoder (byte tokens, known without loading a tokenizer): some prompt must
    leave room for a response within model.max_length. (With a Hugging Face tokenizer the same check runs
    when the coordinator tokenises, and its error reaches the user the same way.)"""
    from raysim.models import is_random_decoder

    if cfg.task.type != "causal_lm" or not is_random_decoder(cfg.model.name) or not raw.prompts:
        return
    shortest = min(len(p.encode("utf-8")) for p in raw.prompts) + 1          # + BOS
    if shortest >= cfg.model.max_length:
        raise ConfigError(f"model.max_length: {cfg.model.max_length} tokens leave no room for a response: every "
                          f"prompt has at least {shortest} tokens; raise model.max_length")


def _check_task_keys(cfg: ExperimentConfig) -> None:
    """Keys that only make sense for some task types."""
    task = cfg.task.type
    if cfg.data.label_noise is not None and task != "seq_cls":
        raise ConfigError(f"data.label_noise: flips class labels, so it needs task.type seq_cls (got {task})")
    if cfg.data.domains is not None and task != "image_cls":
        raise ConfigError(f"data.domains: image transforms need task.type image_cls (got {task})")
    if task == "image_cls" and cfg.data.image_size is not None:
        from raysim.models import image_spec

        size = image_spec(cfg.model.name)["image_size"]
        if cfg.data.image_size != size:
            raise ConfigError(f"data.image_size: {cfg.data.image_size} does not fit {cfg.model.name}, which "
                              f"takes {size}×{size} images; use {size} or null")


def start_ray(address: str | None, cfg: ExperimentConfig, verbose: bool = False, driver_cpus: int = 0) -> bool:
    """Join or start Ray: an explicit address, else RAY_ADDRESS (set inside a Ray job), else a private local
    instance without dashboard or autoscaler monitor (`lean_local_head`; never another user's cluster by
    accident). Returns True if this call started Ray (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        have, need = os.cpu_count() or 1, cfg.resources.num_workers * cfg.resources.cpus_per_worker
        if need > have:                     # never more logical CPUs than the machine has
            raise ConfigError(f"resources.num_workers: {cfg.resources.num_workers} workers × cpus_per_worker "
                              f"{cfg.resources.cpus_per_worker:g} need {need:g} CPUs but this machine has {have}; "
                              "use fewer workers, a smaller resources.cpus_per_worker, or a cluster (--address)")
        # driver_cpus: logical CPUs for processes that mostly wait (a sweep's trial drivers), on top of the cores
        with lean_local_head(forward_logs=verbose):
            ray.init(address="local", num_cpus=max(have, math.ceil(need) + driver_cpus), include_dashboard=False,
                     **quiet)
    return True


# Ray's head-node steps that a private single-machine instance does not need: with include_dashboard=False
# Ray still starts a dashboard process (it serves only usage statistics, which raysim turns off) and waits
# for it to come up, about a second on two cores, before it starts the raylet; and the autoscaler monitor has
# nothing to scale on one machine.
LEAN_SKIPPED_STEPS = ("start_api_server", "start_monitor")
# Skipped too when worker output is not forwarded to the driver (`raysim run` without --verbose): the log
# monitor's only job is that forwarding.
QUIET_SKIPPED_STEPS = ("start_log_monitor",)


@contextlib.contextmanager
def lean_local_head(forward_logs: bool = False):
    """While a private local Ray starts: skip the steps of LEAN_SKIPPED_STEPS (and, unless `forward_logs`,
    QUIET_SKIPPED_STEPS), and start the raylet's dashboard agent in its minimal mode (no HTTP server, no
    metrics exporter: with no dashboard nothing reads them; it comes up faster and takes less CPU while the
    workers start). All are (private) names in Ray, replaced for this block only; a Ray without one of them
    starts unchanged."""
    try:
        import ray._private.utils as ray_utils
        from ray._private.node import Node
    except ImportError:
        yield
        return
    skipped = LEAN_SKIPPED_STEPS + (() if forward_logs else QUIET_SKIPPED_STEPS)
    patches = [(Node, name, lambda self, *args, **kwargs: None) for name in skipped]
    patches.append((ray_utils, "get_dashboard_dependency_error", lambda: "a private local Ray without dashboard"))
    saved = [(owner, name, getattr(owner, name, None)) for owner, name, _ in patches]
    if any(original is None for _, _, original in saved):
        yield
        return
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def stop_ray() -> None:
    """`ray.shutdown()` of the Ray this process started. The local instance's autoscaler monitor (there is
    nothing to autoscale on one machine, and it keeps no state) ignores SIGTERM, so Ray's shutdown would wait
    its full second-long grace period for it: it is killed first."""
    import ray

    try:                                           # Ray's private node handle: absent when joined, not started
        for info in ray._private.worker._global_node.all_processes.get("monitor", []):
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - Ray's shutdown below stops it anyway
        pass
    ray.shutdown()


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


def run_experiment(cfg: ExperimentConfig, run_dir: "str | Path", *, address: str | None = None, verbose: bool = False,
                   resume: bool = False, progress: bool = True,
                   on_round: Callable[[dict[str, Any], Any], None] | None = None,
                   prepared=None) -> dict[str, Any]:
    """Run (or resume) one simulation into `run_dir` (a local path or a URI such as s3://bucket/run); returns
    the summary dict (with `startup_phases`). on_round(row, checkpoint) runs after each round is written."""
    from raysim.checkpoint import config_hash, drop_orphan_segments, load_newest_intact
    from raysim.tasks import logged_metrics

    clock = PhaseClock()
    raw, partition = prepared if prepared is not None else prepare_data(cfg)
    clock.lap("data_s")
    writer = RunWriter(run_dir)
    cfg_hash = config_hash(cfg.to_yaml_dict())
    found = load_newest_intact(run_dir, config_hash=cfg_hash) if resume else None   # checked before Ray starts
    if resume:
        drop_orphan_segments(run_dir)                 # per-client state written after the newest checkpoint
    else:
        writer.write_config(cfg.to_yaml_dict())
    started_ray = start_ray(address, cfg, verbose)
    clock.lap("ray_init_s")
    session = None
    try:
        refuse_node_local(run_dir)
        session = Session.start(cfg, raw, partition, run_dir)
        _warn_truncation(session.data_report, cfg)
        first_round = session.restore(found, writer) if resume else 1
        clock.lap("workers_ready_s")
        with progress_bar(progress, cfg, first_round) as bar:
            recorder = Recorder(session.coordinator, writer, run_dir, bar, on_round, logged_metrics(cfg), cfg_hash)
            failure = drive_rounds(session.coordinator, recorder, first_round, cfg, clock)
        if failure is None:                            # a failed run gets no adapter: it is not a result
            _export_adapter(session, writer, cfg, int(raw.num_labels))
        summary = writer.write_summary(cfg.to_yaml_dict(), {
            "status": "failed" if failure else "completed", "failure": failure, "data": _data_facts(session, partition),
            **_cohort_calibration(session, cfg),
            "setup_s": clock.phases["data_s"] + clock.phases["ray_init_s"] + clock.phases["workers_ready_s"],
            "total_s": clock.elapsed(), "gpus_per_worker": session.spec.gpus,
            "run_dir": RunStorage.of(run_dir).uri(), "cluster": _cluster_info()})
    finally:
        clock.lap(None)
        if session is not None:
            session.stop()
        if started_ray:
            stop_ray()
        clock.lap("teardown_s")
    summary["startup_phases"] = clock.summary()
    return summary


def _data_facts(session: "Session", partition: dict[str, Any]) -> dict[str, Any]:
    """What tokenisation cut, and for per-client data what the source holds (clients, held-out clients, ...)."""
    per_client = partition.get("per_client")
    return {**session.data_report, **({"per_client": per_client.describe()} if per_client is not None else {})}


def _cohort_calibration(session: "Session", cfg: ExperimentConfig) -> dict[str, Any]:
    """With `resources.cohort_size: auto` and the cohort engine: {"cohort_calibration": {worker: what it chose
    and measured}}; else nothing."""
    import ray

    if cfg.resources.engine != "cohort" or cfg.resources.cohort_size != "auto":
        return {}
    found = ray.get(session.coordinator.cohort_calibrations.remote(), timeout=120)
    return {"cohort_calibration": {str(k): v for k, v in sorted(found.items())}}


def _cluster_info() -> dict[str, Any]:
    """Where the run ran: the Ray cluster's GCS address and its live nodes."""
    import ray

    return {"gcs_address": ray.get_runtime_context().gcs_address,
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive"))}


def _export_adapter(session: "Session", writer: RunWriter, cfg: ExperimentConfig, num_labels: int) -> None:
    """The final global model as a portable PEFT adapter directory (+ base delta), from a live worker."""
    import ray

    from raysim.export import portable_adapter_files

    files, base_delta = ray.get(session.coordinator.final_adapter.remote(_base_name(cfg)), timeout=900)
    writer.write_adapter(portable_adapter_files(files, cfg, num_labels, base_delta is not None), base_delta)


class Session:
    """The actors of one run: its workers and the coordinator that drives them."""

    def __init__(self, spec, workers, coordinator):
        self.spec = spec
        self.workers = workers
        self.coordinator = coordinator
        self.data_report: dict[str, int] = {}       # what tokenisation cut (coordinator.ready)

    @classmethod
    def start(cls, cfg: ExperimentConfig, raw, partition, run_dir=None) -> "Session":
        import ray

        from raysim.coordinator import Coordinator
        from raysim.pool import WorkerSpec, spawn_workers

        spec = WorkerSpec(cfg, int(raw.num_labels), cfg.resources.cpus_per_worker, resolve_gpus(cfg))
        workers = spawn_workers(spec)              # they import torch and build the model from now on
        store_dir = RunStorage.of(run_dir).uri() if run_dir is not None else None    # per-client state files
        coordinator = Coordinator.options(**_on_head_node()).remote(cfg, raw, partition, spec, workers, store_dir)
        session = cls(spec, workers, coordinator)
        try:
            session.data_report = ray.get(coordinator.ready.remote(), timeout=900)
        except BaseException as exc:
            session.stop()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ConfigError):    # a data mistake only tokenisation can see: one clear message
                raise ConfigError(str(cause).splitlines()[0]) from None
            raise
        return session

    def restore(self, found, writer: RunWriter) -> int:
        """Resume from the newest intact checkpoint `found` ((tensors, meta, name) or None: from the start);
        returns the first round to run."""
        import ray

        done = 0
        if found is not None:
            tensors, meta, _ = found
            done = ray.get(self.coordinator.load_state_dict.remote(tensors, meta), timeout=600)
        writer.load_existing(done)
        return done + 1

    def stop(self) -> None:
        import ray

        try:
            ray.get(self.coordinator.shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - teardown must not mask the real error
            pass
        for actor in [self.coordinator, *self.workers]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _on_head_node() -> dict[str, Any]:
    """Actor options that keep the coordinator on the head node, which lives as long as the cluster (inside a
    placement group, e.g. a Tune trial's, it stays in the group)."""
    from ray.util import get_current_placement_group

    return {} if get_current_placement_group() is not None else {"resources": {"node:__internal_head__": 0.001}}


def _warn_truncation(report: dict[str, int], cfg: ExperimentConfig) -> None:
    """One line on stderr when tokenisation cut examples at model.max_length."""
    import sys

    if report["examples_truncated"] or report["examples_prompt_too_long"]:
        print(f"raysim: model.max_length {cfg.model.max_length}: {report['examples_truncated']} examples "
              f"truncated, {report['examples_prompt_too_long']} with a prompt that fills it (no loss)",
              file=sys.stderr)


def _base_name(cfg: ExperimentConfig) -> str:
    from raysim.models import model_path

    return cfg.model.name if cfg.model.name.startswith("random:") else model_path(cfg.model.name)
