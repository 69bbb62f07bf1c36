"""`raysim` command line. Config mistakes print one clear message and exit with code 2, before Ray.

`raysim run` stays import-light on the driver until the run starts (no torch, peft or transformers while
the config and data are checked): the modules of the other subcommands (sweep, report, bench) are only
imported when one of them, or the top-level help, is asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from raysim.checkpoint import CheckpointError  # noqa: E402
from raysim.errors import ConfigError  # noqa: E402

EXIT_CONFIG = 2
EXIT_FAILED = 3            # the run ended with status failed (federation.max_degraded_rounds)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto or ip:port); default: "
                   "RAY_ADDRESS inside a Ray job, else a private local instance")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs")


def cmd_run(args) -> int:
    from raysim.runner import default_run_dir, run_experiment

    if args.resume:
        run_dir = args.resume                           # a local path or a filesystem URI (s3://...)
        cfg = _resume_config(run_dir, args.set)
    else:
        from raysim.config import load_config

        if args.config is None:
            raise ConfigError("raysim run: give a config file (or --resume DIR)")
        cfg = load_config(args.config, args.set)
        run_dir = args.out or str(default_run_dir(cfg))
        _claim_run_dir(run_dir, args.overwrite)
    # run_experiment prepares the data before it starts Ray: data errors surface there, before any Ray work
    summary = run_experiment(cfg, run_dir, address=args.address, verbose=args.verbose, resume=bool(args.resume),
                             progress=not args.no_progress)
    if summary.get("status") == "failed":
        print(f"raysim: run failed: {summary.get('failure')} ({run_dir})", file=sys.stderr)
        return EXIT_FAILED
    final = summary["final"]
    shown = [f"final {k} {final[k]:.4f}" for k in ("accuracy", "exact_match", "perplexity")
             if final.get(k) is not None]
    if final.get("deviation_rel") is not None:
        shown.append(f"deviation_rel {final['deviation_rel']:.2e}")
    print("  ".join([f"done: {run_dir}", *shown]))
    return 0


# keys `--resume DIR --set` may change: they extend or tune the run without changing what a round computes
RESUME_KEYS = ("federation.rounds", "federation.round_timeout_s", "federation.hung_after_s",
               "output.checkpoint_every", "resources.num_workers")


def _resume_config(run_dir: str, overrides: list[str]):
    """The interrupted run's config, with the few keys that may change on resume (more rounds, deadlines)."""
    from raysim.config import apply_overrides, parse_override, parse_yaml_text, validate_config
    from raysim.storage import RunStorage

    storage = RunStorage.of(run_dir)
    if not storage.is_file("config.yaml"):
        raise ConfigError(f"--resume: {run_dir} has no config.yaml (not a raysim run directory)")
    finished = storage.is_file("summary.json")
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if key not in RESUME_KEYS:
            raise ConfigError(f"--set {key}: cannot change when resuming (the rounds already run would belong to "
                              f"another experiment); allowed with --resume: {', '.join(RESUME_KEYS)}")
    raw = parse_yaml_text(storage.read_text("config.yaml"), storage.uri("config.yaml"))
    done = raw.get("federation", {}).get("rounds")
    cfg = validate_config(apply_overrides(raw, overrides))
    if done is not None and cfg.federation.rounds < done:
        raise ConfigError(f"--set federation.rounds: {cfg.federation.rounds} is fewer than the run's {done}; a "
                          "resumed run can only be extended")
    if finished and cfg.federation.rounds == done:
        raise ConfigError(f"--resume: {run_dir} already finished all {done} rounds; to continue it, give more: "
                          f"--set federation.rounds=N with N > {done}")
    if overrides:
        from raysim.metrics import RunWriter

        RunWriter(storage).write_config(cfg.to_yaml_dict())
    if finished:                                  # extended: no longer complete until the new rounds are done
        storage.delete("summary.json")
    return cfg


def _claim_run_dir(run_dir: str, overwrite: bool) -> None:
    """A new run needs an empty (or new) directory: never mix two runs or delete one by accident."""
    from raysim.storage import RunStorage

    if "://" not in run_dir and Path(run_dir).is_file():
        raise ConfigError(f"--out: {run_dir} is a file, not a directory")
    storage = RunStorage.of(run_dir)
    if not storage.listdir():
        return
    if not overwrite:
        what = "a finished run" if storage.is_file("summary.json") else "files (an unfinished run?)"
        raise ConfigError(f"--out: {run_dir} already holds {what}; continue it with --resume {run_dir}, replace it "
                          f"with --overwrite, or choose another directory")
    storage.delete_dir("")


def cmd_aggregators(args) -> int:
    from raysim.aggregators import REGISTRY

    for name in sorted(REGISTRY):
        d = REGISTRY[name].describe()
        print(f"{name:12s} {d['summary']}")
        print(f"{'':12s}   exact: {d['exact']}   mixed ranks: {d['mixed_ranks']}   per module: {d['comm_per_module']}")
        print(f"{'':12s}   uploads: {d['uploads']}   broadcasts: {d['broadcasts']}")
    return 0


def cmd_config_docs(args) -> int:
    from raysim.configdoc import render

    sys.stdout.write(render())
    return 0


BUILTIN_COMMANDS = ("run", "aggregators", "config-docs")


def build_parser(extras: bool = True) -> argparse.ArgumentParser:
    """The parser; `extras=False` leaves out the subcommands that live in other modules (faster, lighter)."""
    parser = argparse.ArgumentParser(prog="raysim", description="Federated LoRA fine-tuning simulator on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one simulation from a YAML config")
    run.add_argument("config", nargs="?", help="experiment YAML")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (dotted; value parsed as YAML); repeatable. Setting a "
                     "union's tag (data.partition.scheme, lora.rank.scheme, aggregator.name) switches the section "
                     "to that variant and drops the keys it lacks (named on stderr)")
    run.add_argument("--out", help="run directory (default runs/<name>-<timestamp>)")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its newest intact "
                     "checkpoint; --set may then change only " + ", ".join(RESUME_KEYS))
    run.add_argument("--overwrite", action="store_true", help="delete what --out already holds and start afresh "
                     "(without it a non-empty --out is refused)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(run)
    run.set_defaults(func=cmd_run)

    aggs = sub.add_parser("aggregators", help="list registered aggregators")
    aggs.set_defaults(func=cmd_aggregators)

    docs = sub.add_parser("config-docs", help="print the config reference (docs/config.md) generated from the "
                          "schema")
    docs.set_defaults(func=cmd_config_docs)

    for extra in _extra_commands() if extras else ():
        extra(sub, _add_common)
    return parser


def _extra_commands():
    """Subcommands that live in their own modules (sweep, report, bench), if present."""
    import importlib

    found = []
    for module in ("raysim.tune", "raysim.report", "raysim.bench"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        if hasattr(mod, "add_cli"):
            found.append(mod.add_cli)
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(extras=command not in BUILTIN_COMMANDS)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"raysim: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CheckpointError as exc:            # --resume: a checkpoint of another config, or none intact
        print(f"raysim: error: --resume: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("raysim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
