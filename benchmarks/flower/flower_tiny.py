"""raysim's `tiny` workload in Flower's simulation engine (Ray backend), for benchmarks/flower/compare.py.

Run with the Flower virtualenv (benchmarks/flower/setup.sh):

    benchmarks/flower/.venv/bin/python benchmarks/flower/flower_tiny.py [--config tiny.yaml]

The server is Flower's message-API `FedAvg` over the trainable tensors (LoRA factors + head,
weighted by `num-examples`) = FedIT; `clients_per_round` of `num_clients` virtual SuperNodes train
per round on `num_workers` Ray actors of `cpus_per_worker` CPUs each; the global model is evaluated
on the global test split every `eval.every` rounds and after the last (not before round 1), like
raysim. Flower's logs are silenced unless --verbose. Prints one JSON line: wall seconds from
process start (imports, Ray start, simulation, Ray teardown) and the final test accuracy.
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")    # no telemetry requests (and their exit timeout)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import flwr  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import tiny_task  # noqa: E402  (imported by name so Ray actors import it instead of unpickling it)

DEFAULT_CONFIG = Path(__file__).resolve().with_name("tiny.yaml")


def global_evaluate(config_json: str, history: list[dict], server_round: int,
                    arrays: ArrayRecord) -> MetricRecord | None:
    """Centralised evaluation on the global test split (skips round 0 and rounds off `eval.every`)."""
    w = tiny_task.workload(config_json)
    every, rounds = w.cfg.eval.every, w.cfg.federation.rounds
    if server_round == 0 or (server_round % every and server_round != rounds):
        return None
    net = tiny_task.model(config_json)
    tiny_task.load_trainable(net, arrays.to_torch_state_dict())
    loss, accuracy = tiny_task.evaluate(net, w)
    history.append({"round": server_round, "accuracy": accuracy, "loss": loss})
    return MetricRecord({"accuracy": accuracy, "loss": loss})


def make_server_app(config_json: str, history: list[dict]) -> ServerApp:
    """The ServerApp: FedAvg of the LoRA factors + head for `federation.rounds` rounds."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        w, net = tiny_task.workload(config_json), tiny_task.model(config_json)
        fed = w.cfg.federation
        strategy = FedAvg(fraction_train=fed.clients_per_round / fed.num_clients, fraction_evaluate=0.0,
                          min_train_nodes=fed.clients_per_round, min_available_nodes=fed.num_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny_task.trainable_state(net)),
                       num_rounds=fed.rounds, train_config=ConfigRecord({"workload": config_json}),
                       evaluate_fn=partial(global_evaluate, config_json, history))

    return app


def backend_config(cfg, verbose: bool) -> dict:
    """Ray with num_workers × cpus_per_worker CPUs, so Flower's pool has num_workers actors."""
    res = cfg.resources
    init_args = {"num_cpus": res.num_workers * res.cpus_per_worker, "num_gpus": 0, "include_dashboard": False}
    if not verbose:
        init_args.update(logging_level=logging.ERROR, log_to_driver=False)
    return {"init_args": init_args, "client_resources": {"num_cpus": res.cpus_per_worker, "num_gpus": 0.0}}


def run(config_json: str, verbose: bool = False) -> dict:
    """Run the simulation of the run config `config_json` (`tiny_task.load_run_config`); returns the
    result record printed by `main`."""
    import ray

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)   # Ray's and transformers' notices
    w = tiny_task.workload(config_json)         # build the data before Ray starts, as raysim does
    history: list[dict] = []
    run_simulation(server_app=make_server_app(config_json, history), client_app=tiny_task.app,
                   num_supernodes=w.cfg.federation.num_clients, backend_config=backend_config(w.cfg, verbose),
                   verbose_logging=verbose)
    if ray.is_initialized():
        ray.shutdown()
    if len(history) == 0 or history[-1]["round"] != w.cfg.federation.rounds:
        raise RuntimeError(f"the simulation did not finish its {w.cfg.federation.rounds} rounds "
                           f"(evaluated rounds: {[h['round'] for h in history]}); rerun with --verbose")
    return {"framework": "flower", "flwr": flwr.__version__, "ray": ray.__version__,
            "rounds": w.cfg.federation.rounds, "final_accuracy": history[-1]["accuracy"],
            "final_loss": history[-1]["loss"], "accuracy_by_round": [round(h["accuracy"], 4) for h in history]}


def process_start() -> float:
    """When this process was created (psutil, a Ray dependency), else when this module started."""
    try:
        import psutil

        return psutil.Process().create_time()
    except (ImportError, OSError):
        return T0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="raysim run config (default: tiny.yaml here)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as in `raysim run --set` (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="Flower's and Ray's logs")
    args = p.parse_args(argv)
    record = run(tiny_task.load_run_config(args.config, args.set), verbose=args.verbose)
    record["wall_s"] = round(time.time() - process_start(), 3)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
