"""The sweep driver: Ray and Tuner setup, resuming, progress lines and signal handling.

A sweep directory holds `sweep.yaml` (a self-contained copy of the sweep file), `trials.parquet`,
`trials/` (one raysim run directory per trial) and `tune/` (Tune's experiment state). It is a local path or
a filesystem URI (`s3://bucket/prefix`, ...): raysim's files go through `raysim.storage.RunStorage` and
Tune's `storage_path` is the same storage, so trials on any node of a cluster write to it. `--resume`
restores the Tuner from `tune/`: unfinished trials continue from their last round, finished ones are not
rerun. Restoring unpickles Tune's saved state, so only resume a sweep directory you trust.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from raysim.config import ConfigError
from raysim.storage import RunStorage, refuse_node_local
from raysim.tune.spec import SweepSpec, grid_combinations, parse_sweep
from raysim.tune.table import TRIALS_DIR, TUNE_DIR, print_summary, trials_table, write_trials
from raysim.tune.trial import make_resources, make_trainable, trial_bundles, trial_config, trial_dirname


class Progress:
    """Driver-side view of the sweep: one line per finished trial; optional stop after N trials."""

    def __init__(self, trials_dir: "RunStorage | str | Path", stop_after: int | None, quiet: bool):
        self.trials = RunStorage.of(trials_dir)
        self.stop_after = stop_after
        self.quiet = quiet
        self.finished = 0
        self.stopping = False

    def trial_done(self, trial, error: bool) -> None:
        self.finished += 1
        if not self.quiet and not self.stopping:        # (trials Tune winds down after a stop are resumable)
            print(self._line(trial, error), flush=True)
        if self.stop_after is not None and self.finished >= self.stop_after and not self.stopping:
            self.stopping = True
            if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
                # Tune's own interrupt path (as for Ctrl+C): stop, save the experiment state, stay resumable
                os.kill(os.getpid(), signal.SIGUSR1)

    def _line(self, trial, error: bool) -> str:
        name = Path(trial.path).name if getattr(trial, "path", None) else str(trial)
        res = trial.last_result or {}
        if error:
            status = "error"
        elif self.trials.is_file(f"{name}/summary.json"):
            status = "completed"
        else:
            status = f"stopped at round {res.get('round', '?')}"
        acc = res.get("accuracy")
        extra = f"  accuracy {acc:.4f}" if isinstance(acc, float) and not math.isnan(acc) else ""
        return f"[sweep] {name}: {status}{extra}"


_ACTIVE: Progress | None = None     # the progress of the sweep this process is running now


def _trial_finished(trial, error: bool) -> None:
    if _ACTIVE is not None:
        _ACTIVE.trial_done(trial, error=error)


def make_callback():
    """Tune's callback, pickled into the experiment state and restored on --resume. It calls the
    module-level `_trial_finished` (pickled by reference), so a restored callback reports to the live
    driver's progress, not to a copy pickled with the state."""
    from ray import tune

    class RaysimSweepCallback(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _trial_finished(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            _trial_finished(trial, error=True)

    return RaysimSweepCallback()


def start_sweep_ray(address: str | None, need_cpus: float, num_cpus: int | None, verbose: bool) -> bool:
    """runner.start_ray: join Ray if initialised, else --address, else RAY_ADDRESS, else a private local
    instance — here with logical CPUs for the largest trial (or --num-cpus). True if this call started Ray."""
    from raysim.runner import start_ray

    # a trial's first bundle (1 CPU) holds its driver, which waits on its workers: it is not counted against
    # the machine's cores; the workers are (start_ray refuses more than the cores, never inflating them)
    workers = max(math.ceil(need_cpus) - 1, (num_cpus or 0) - 1, 0)
    return start_ray(address, SimpleNamespace(resources=SimpleNamespace(num_workers=workers, cpus_per_worker=1)),
                     verbose, driver_cpus=1)


def check_cluster_fits(spec: SweepSpec, cluster_gpus: float, strict: bool) -> None:
    """Every enumerable trial's placement group must fit the cluster, else Tune would wait forever. On a
    Ray we started that is a ConfigError; on a joined cluster (which may autoscale) a warning."""
    import ray

    have = ray.cluster_resources()
    for combo in grid_combinations(spec):
        problem = _fit_problem(trial_config(spec.base, combo, cluster_gpus=cluster_gpus), have)
        if problem and strict:
            raise ConfigError(problem)
        if problem:
            print(f"[sweep] warning: {problem} (waiting for the cluster to scale up)", file=sys.stderr)
            return


def _fit_problem(cfg, have: dict[str, float]) -> str | None:
    """Why one trial's bundles exceed the cluster's GPUs or CPUs (None if they fit)."""
    bundles = trial_bundles(cfg)
    r = cfg.resources
    for kind, what in (("GPU", f"{r.num_workers} workers × {r.gpus_per_worker:g} GPU"),
                       ("CPU", f"1 + {r.num_workers} workers × {r.cpus_per_worker:g} CPU")):
        need = sum(b.get(kind, 0.0) for b in bundles)
        if need > have.get(kind, 0.0) + 1e-9:
            return (f"resources: a trial needs {need:g} {kind}s ({what}) but the Ray cluster has "
                    f"{have.get(kind, 0.0):g}; lower resources.num_workers / cpus_per_worker / "
                    "gpus_per_worker (gpus_per_worker: auto adapts to the cluster)")
    return None


def _max_trial_cpus(spec: SweepSpec) -> float:
    return max((sum(b.get("CPU", 0.0) for b in trial_bundles(trial_config(spec.base, combo)))
                for combo in grid_combinations(spec)), default=0.0)


def run_sweep(spec: SweepSpec | None, sweep_dir: "str | Path | RunStorage", *, resume: bool = False,
              address: str | None = None, num_cpus: int | None = None, stop_after_trials: int | None = None,
              verbose: bool = False, quiet: bool = False):
    """Run (or resume) a sweep into `sweep_dir` (a local path or a filesystem URI); writes sweep.yaml and
    trials.parquet. Returns the trials table (pandas). `spec` is read from sweep_dir/sweep.yaml when resuming."""
    global _ACTIVE
    sweep = RunStorage.of(sweep_dir)
    spec = _sweep_to_run(spec, sweep, resume)
    if stop_after_trials is not None and stop_after_trials < 1:
        raise ConfigError("--stop-after-trials: must be >= 1")
    _quiet_tune_env()
    import ray

    joins_cluster = not ray.is_initialized() and bool(address or os.environ.get("RAY_ADDRESS"))
    started = start_sweep_ray(address, _max_trial_cpus(spec), num_cpus, verbose)
    try:
        refuse_node_local(sweep)
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        check_cluster_fits(spec, cluster_gpus, strict=not joins_cluster)   # a cluster may scale up
        trials = _prepare_sweep_dir(spec, sweep, resume)
        _ACTIVE = Progress(trials, stop_after_trials, quiet)
        tuner = _make_tuner(spec, sweep, cluster_gpus, resume)
        if not quiet:
            print(f"[sweep] {spec.name}: {spec.num_trials()} trials -> {sweep.uri()}", flush=True)
        with _quiet_tune_logs(verbose), _own_signal_handlers():
            tuner.fit()
        table = trials_table(spec, sweep)
        write_trials(table, sweep)
        if not quiet:
            print_summary(table, sweep)
        return table
    finally:
        _ACTIVE = None
        if started:
            from raysim.runner import stop_ray

            stop_ray()


def _sweep_to_run(spec: SweepSpec | None, sweep: RunStorage, resume: bool) -> SweepSpec:
    """The spec given, or on --resume the one saved in the sweep dir; refuses to overwrite a sweep."""
    if resume:
        if not sweep.is_file("sweep.yaml") or not sweep.exists(TUNE_DIR):
            raise ConfigError(f"--resume: {sweep.uri()} is not a raysim sweep directory "
                              f"(no sweep.yaml / {TUNE_DIR}/)")
        try:
            raw = yaml.safe_load(sweep.read_text("sweep.yaml"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--resume: {sweep.uri('sweep.yaml')} is not valid YAML: {exc}") from None
        base_dir = sweep.local_path() if sweep.is_local else None
        return parse_sweep(raw, base_dir=base_dir, check_data=False)
    if spec is None:
        raise ConfigError("raysim sweep: give a sweep file (or --resume DIR)")
    if sweep.exists("sweep.yaml") or sweep.exists(TUNE_DIR):
        raise ConfigError(f"--out: {sweep.uri()} already holds a sweep; continue it with "
                          f"--resume {sweep.uri()}")
    return spec


def _prepare_sweep_dir(spec: SweepSpec, sweep: RunStorage, resume: bool) -> RunStorage:
    """Create the sweep dir (writing sweep.yaml for a new sweep); returns its trials/ folder."""
    sweep.makedirs(TRIALS_DIR)
    if not resume:
        sweep.write_text("sweep.yaml", yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False))
    return sweep.child(TRIALS_DIR)


def _make_tuner(spec: SweepSpec, sweep: RunStorage, cluster_gpus: float, resume: bool):
    """A new Tuner, or on --resume the one restored from tune/ (errored trials are retried). Tune keeps its
    state and checkpoints in the sweep's own storage (`storage_filesystem`), reachable from every node."""
    from ray import tune

    tune_path = sweep.path(TUNE_DIR)
    trainable = tune.with_resources(
        make_trainable(spec.base, sweep.child(TRIALS_DIR), cluster_gpus, spec.checkpoint_every, spec.name),
        resources=make_resources(spec.base, cluster_gpus, spec.checkpoint_every))
    if resume:
        if not tune.Tuner.can_restore(tune_path, storage_filesystem=sweep.fs):
            raise ConfigError(f"--resume: Tune has no saved experiment state in {sweep.uri(TUNE_DIR)}")
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True, storage_filesystem=sweep.fs)
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=sweep.storage_path, storage_filesystem=sweep.fs,
                                verbose=0, callbacks=[make_callback()],
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures))
    return tune.Tuner(trainable, param_space=_param_space(spec), tune_config=_tune_config(spec),
                      run_config=run_config)


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    samplers = {"grid_search": lambda a: tune.grid_search(list(a)), "choice": lambda a: tune.choice(list(a)),
                "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                "randint": lambda a: tune.randint(*a)}
    space: dict[str, Any] = {}
    for key, dist in spec.search_space.items():
        kind, args = next(iter(dist.items()))
        space[key] = samplers[kind](args)
    if spec.seeds:
        space["seed"] = tune.grid_search(list(spec.seeds))
    return space


def _tune_config(spec: SweepSpec):
    from ray import tune

    scheduler = None
    if spec.scheduler:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", max_t=spec.scheduler["max_t"],
            grace_period=spec.scheduler["grace_period"], reduction_factor=spec.scheduler["reduction_factor"])
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
                           max_concurrent_trials=spec.max_concurrent_trials, trial_dirname_creator=trial_dirname)


def _quiet_tune_env() -> None:
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"                  # trials keep the driver's relative paths
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


class _own_signal_handlers:
    """Tune installs SIGINT/SIGUSR1 handlers for its run and leaves them behind; put ours back afterwards."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self.saved[sig] = signal.getsignal(sig)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False


class _quiet_tune_logs:
    """Tune logs warnings (interrupts, incomplete trials) that raysim reports itself, more briefly."""

    def __init__(self, verbose: bool):
        self.verbose = verbose

    def __enter__(self):
        import logging

        self.saved = {}
        if not self.verbose:
            for name in ("ray.tune", "ray.train", "ray.air"):
                logger = logging.getLogger(name)
                self.saved[name] = logger.level
                logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        import logging

        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)
        return False
