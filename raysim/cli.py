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

from raysim.errors import ConfigError  # noqa: E402

EXIT_CONFIG = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto or ip:port); default: "
                   "RAY_ADDRESS inside a Ray job, else a private local instance")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs")


def cmd_run(args) -> int:
    import yaml

    from raysim.config import load_config, validate_config
    from raysim.runner import default_run_dir, run_experiment

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run_dir} has no config.yaml (not a raysim run directory)")
        if (run_dir / "summary.json").is_file():
            raise ConfigError(f"--resume: {run_dir} already finished (summary.json exists)")
        raw_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        cfg = validate_config(raw_cfg)
    else:
        if args.config is None:
            raise ConfigError("raysim run: give a config file (or --resume DIR)")
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg)
        if (run_dir / "summary.json").exists():
            raise ConfigError(f"--out: {run_dir} already holds a finished run; choose another directory")
    # run_experiment prepares the data before it starts Ray: data errors surface there, before any Ray work
    summary = run_experiment(cfg, run_dir, address=args.address, verbose=args.verbose, resume=bool(args.resume),
                             progress=not args.no_progress)
    final = summary["final"]
    shown = [f"final {k} {final[k]:.4f}" for k in ("accuracy", "exact_match", "perplexity")
             if final.get(k) is not None]
    if final.get("deviation_rel") is not None:
        shown.append(f"deviation_rel {final['deviation_rel']:.2e}")
    print("  ".join([f"done: {run_dir}", *shown]))
    return 0


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
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last checkpoint")
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
    except KeyboardInterrupt:
        print("raysim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
