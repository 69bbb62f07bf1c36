"""`raysim bench`: the subcommand, its table on stdout and its JSON file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from raysim.bench.workloads import WORKLOADS


def format_table(out: dict[str, Any]) -> str:
    lines = [f"raysim bench — workload {out['workload']} on {out['device']} "
             f"({out['machine'].get('gpu') or out['machine'].get('cpu', '?')}), {out['date']}",
             f"{'measurement':34s} {'client-steps/s':>15s} {'vs peft':>8s}"]
    peft = out["engines"]["peft"]["client_steps_per_s"]
    lines.append(f"{'floor (plain loop, no Ray)':34s} {out['floor_client_steps_per_s']:15.1f} "
                 f"{out['floor_client_steps_per_s'] / peft:7.2f}x")
    lines.append(f"{'engine peft (in process)':34s} {peft:15.1f} {1.0:7.2f}x")
    for k, v in out["engines"]["cohort"]["by_k"].items():
        lines.append(f"{'engine cohort K=' + k + ' (in process)':34s} {v:15.1f} {v / peft:7.2f}x")
    for engine, res in out.get("e2e", {}).items():
        lines.append(f"{'end to end, ' + engine:34s} {res['client_steps_per_s']:15.1f} "
                     f"{res['client_steps_per_s'] / peft:7.2f}x   round {res['round_time_s']:.3f} s, "
                     f"overhead ratio {res['overhead_ratio']:.2f}, start-up {res['startup_s']:.1f} s, "
                     f"teardown {res['teardown_s']:.1f} s")
    for name, ok in out.get("targets", {}).items():
        lines.append(f"target {name}: {'met' if ok else ('not measured' if ok is None else 'NOT met')}")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.workload == "aggregators":
        from raysim.bench.aggregator_cost import format_aggregator_table, ratios, targets, time_aggregators
        from raysim.bench.machine import machine_info

        clients = (args.clients,) if args.clients else (100, 200)
        out = time_aggregators(clients=clients, trials=max(args.trials, 5))
        out = {"workload": "aggregators", "machine": machine_info(), **out, "ratios": ratios(out),
               "targets": targets(out)}
        print(format_aggregator_table(out))
        for name, ok in out["targets"].items():
            print(f"target {name}: {'met' if ok else 'NOT met'}")
        write_json(args.json, out)
        return 0
    if args.workload == "soak":
        from raysim.bench.soak import run_soak

        out = run_soak(rounds=args.rounds, clients=args.clients, log=log)
        print(json.dumps({k: out[k] for k in ("status", "lost", "memory_growth", "client_status", "targets")}, indent=2))
        write_json(args.json, out)
        return 0
    if args.workload == "scale-10k":
        from raysim.bench.scale import run_scale

        out = run_scale(rounds=args.rounds, clients=args.clients, log=log)
        print(json.dumps(out["peak_rss_mib"], indent=2))
        write_json(args.json, out)
        return 0
    if args.workload == "scale-1m":
        from raysim.bench.scale_1m import run_scale_1m

        out = run_scale_1m(rounds=args.rounds, clients=args.clients, log=log)
        print(json.dumps({"runs": [{k: r[k] for k in ("aggregator", "peak_rss_mib", "round20_over_round3",
                                                        "state_bytes_on_disk")} for r in out["runs"]],
                          "targets": out["targets"]}, indent=2))
        write_json(args.json, out)
        return 0
    from raysim.bench.driver import run_bench

    ks = [int(x) for x in args.ks.split(",")] if args.ks else None
    engines = [] if args.skip_e2e else ([e for e in args.e2e_engines.split(",") if e] if args.e2e_engines else None)
    out = run_bench(args.workload, ks=ks, e2e_engines=engines, rounds=args.rounds, engine_clients=args.clients,
                    min_time_s=args.min_time, device=args.device, address=args.address, verbose=args.verbose,
                    no_dropout=args.no_dropout, trials=args.trials, log=log)
    print(format_table(out))
    write_json(args.json, out)
    return 0


def write_json(path: str | None, out: dict[str, Any]) -> None:
    """Write `out` as indented JSON (numpy scalars as numbers, anything else unknown as text)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
        print(f"wrote {path}")


def _json_default(v):
    return v.item() if hasattr(v, "item") else str(v)


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser("bench", help="throughput of the training engines (client-steps/s), JSON + table")
    p.add_argument("--workload", choices=sorted(WORKLOADS) + ["scale-10k", "scale-1m", "aggregators", "soak"],
                   default="tiny", help="tiny (CPU: random bert-tiny, 100 synthetic clients, 10 per round), "
                   "causal-tiny (CPU: random llama-tiny on synthetic arithmetic, the same federation), "
                   "minilm, bert-base (GPU: random MiniLM-L6 / BERT-base shapes, 256 clients, 128 per round); "
                   "llama-1b (GPU: Llama-3.2-1B shapes, bf16, 256 tokens, LoRA r=16 on q/k/v/o); "
                   "scale-10k: 10,000 clients, 100 per round, peak RSS of driver and coordinator; scale-1m: "
                   "1,000,000 per-client synthetic clients, 1,000 per round, 20 rounds, FedIT and FedSA-LoRA (memory, "
                   "round times, bookkeeping, state on disk); aggregators: "
                   "server seconds per round of every aggregator for 100 and 200 clients of a BERT-base "
                   "adapter (r=16, q/v, 12 layers) against calibration_s, medians of >= 5 trials; soak: 200 "
                   "rounds x 1,000 synthetic clients with worker kills, drop-outs and corrupt uploads (nothing lost, "
                   "memory flat)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--ks", help="comma-separated cohort sizes to measure (default per workload)")
    p.add_argument("--e2e-engines", help="comma-separated engines for the end-to-end runs (default peft,cohort)")
    p.add_argument("--skip-e2e", action="store_true", help="only the in-process measurements")
    p.add_argument("--trials", type=int, default=1,
                   help="end-to-end runs per engine, interleaved; the JSON reports medians and every run (default 1)")
    p.add_argument("--rounds", type=int, help="end-to-end rounds (default per workload)")
    p.add_argument("--clients", type=int, help="clients per in-process measurement (default per workload; "
                   "scale-10k, scale-1m: the number of virtual clients)")
    p.add_argument("--min-time", type=float, help="seconds per in-process measurement (default per workload)")
    p.add_argument("--no-dropout", action="store_true",
                   help="turn the base model's dropout off for the in-process measurements (the ceiling)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the workload's device (tiny: cpu; minilm, bert-base: cuda)")
    add_common(p)
    p.set_defaults(func=cmd_bench)
