"""`raysim sweep FILE` / `raysim sweep --resume DIR`: the command line of the sweep driver. DIR (and --out)
is a local path or a filesystem URI such as s3://bucket/prefix."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from raysim.config import ConfigError
from raysim.tune.driver import run_sweep
from raysim.tune.spec import SweepSpec, load_sweep


def default_sweep_dir(spec: SweepSpec) -> Path:
    return Path("runs") / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def cmd_sweep(args) -> int:
    if args.resume:
        if args.file or args.set:
            raise ConfigError("raysim sweep: --resume DIR continues the sweep as it was; give no FILE or --set")
        spec, sweep_dir = None, args.resume
    else:
        if not args.file:
            raise ConfigError("raysim sweep: give a sweep file (or --resume DIR)")
        spec = load_sweep(args.file, overrides=args.set)   # every config/data mistake surfaces here
        sweep_dir = args.out or default_sweep_dir(spec)
    t0 = time.time()
    table = run_sweep(spec, sweep_dir, resume=bool(args.resume), address=args.address, num_cpus=args.num_cpus,
                      stop_after_trials=args.stop_after_trials, verbose=args.verbose)
    print(f"[sweep] done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 1 if len(table) and (table["status"] == "error").any() else 0


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a Ray Tune sweep of simulations (resumable)",
        description="Run a Ray Tune sweep: every trial is one whole simulation in DIR/trials/. DIR is a local "
                    "path or a filesystem URI (s3://bucket/prefix?endpoint_override=...; gs://...); on a Ray "
                    "cluster of several nodes it must be storage every node reaches (an object store, or a "
                    "shared filesystem path with RAYSIM_SHARED_OUT=1).")
    p.add_argument("file", nargs="?", help="sweep YAML (base: + search_space:)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue an interrupted sweep; finished trials are kept. Tune unpickles the state saved "
                        "in DIR/tune/, which can run code: only resume a sweep directory you trust")
    p.add_argument("--out", metavar="DIR",
                   help="sweep directory: a path or a URI such as s3://bucket/prefix "
                        "(default runs/<name>-<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base run config (dotted; value parsed as YAML); repeatable")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray instance (default: enough for the largest trial)")
    p.add_argument("--stop-after-trials", type=int, default=None, metavar="N",
                   help="stop (resumably) once N trials have finished in this invocation")
    add_common(p)
    p.set_defaults(func=cmd_sweep)
