"""raysim vs Flower on the identical `tiny` workload: N interleaved trials, each a fresh process.

    python benchmarks/flower/compare.py --trials 5 --json benchmarks/results/DATE-HOST-flower-tiny.json

Each trial runs `raysim run tiny.yaml` (raysim's virtualenv) and `flower_tiny.py` (the Flower
virtualenv of setup.sh), alternating which goes first, and times each process wall-clock from
launch to exit (imports, Ray start, 20 rounds with a global evaluation each, Ray teardown). It
records the 1/5/15-minute load averages before and after every process, the CPU count, the date
and the versions of both environments, then writes raw times, medians and the ratio
raysim/flower (< 1: raysim is faster) as JSON and prints a short table. Only the standard library
is used, so any Python 3.11 runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FRAMEWORKS = ("raysim", "flower")
VERSIONS_CODE = """
import importlib.metadata as m, json, platform
out = {"python": platform.python_version()}
for name in ("raysim", "flwr", "ray", "torch", "transformers", "peft", "numpy"):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


def run_env() -> dict[str, str]:
    """The environment of every trial: a private local Ray each time, no hub, no telemetry."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    return env


def commands(args, out_dir: Path, trial: int) -> dict[str, tuple[list[str], Path | None]]:
    """(argv, raysim run directory or None) of each framework for one trial."""
    overrides = [x for item in args.set for x in ("--set", item)]
    run_dir = out_dir / f"raysim-trial{trial}"
    return {
        "raysim": ([args.raysim, "run", args.config, "--out", str(run_dir), "--no-progress", *overrides], run_dir),
        "flower": ([args.flower_python, str(HERE / "flower_tiny.py"), "--config", args.config, *overrides], None),
    }


def reported(framework: str, stdout: str, run_dir: Path | None) -> dict:
    """What a finished run reports about itself: final test accuracy and its own timings."""
    if framework == "flower":
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                rec = json.loads(line)
                return {"final_accuracy": rec.get("final_accuracy"), "self_reported": {"wall_s": rec.get("wall_s")}}
        return {"final_accuracy": None}
    summary = run_dir / "summary.json" if run_dir else None
    if summary and summary.is_file():
        rec = json.loads(summary.read_text())
        times = {k: v for k, v in rec.items() if k.endswith("_s") and isinstance(v, (int, float))}
        return {"final_accuracy": rec.get("final", {}).get("accuracy"), "self_reported": times}
    match = re.search(r"final accuracy ([0-9.]+)", stdout)
    return {"final_accuracy": float(match.group(1)) if match else None}


def time_process(framework: str, argv: list[str], run_dir: Path | None, timeout_s: float) -> dict:
    """Run one trial process; wall seconds from launch to exit plus the load around it."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=timeout_s)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
    wall = time.perf_counter() - t0
    record = {"framework": framework, "wall_s": round(wall, 3), "exit_code": code, "load_before": load_before,
              "load_after": [round(x, 2) for x in os.getloadavg()]}
    if code == 0:
        record.update(reported(framework, stdout, run_dir))
    else:
        record["error_tail"] = (stdout + stderr)[-2000:]
    return record


def run_trials(args) -> list[dict]:
    """`args.trials` rounds of one process per framework, the order alternating between trials."""
    trials = []
    with tempfile.TemporaryDirectory(prefix="flower-compare-") as tmp:
        for trial in range(args.trials):
            cmds = commands(args, Path(tmp), trial)
            order = FRAMEWORKS if trial % 2 == 0 else FRAMEWORKS[::-1]
            for framework in order:
                argv, run_dir = cmds[framework]
                print(f"trial {trial + 1}/{args.trials}: {framework} ...", end=" ", flush=True)
                record = time_process(framework, argv, run_dir, args.timeout)
                record["trial"] = trial + 1
                trials.append(record)
                status = "ok" if record["exit_code"] == 0 else f"FAILED ({record['exit_code']})"
                print(f"{record['wall_s']:.1f} s {status}", flush=True)
                if record["exit_code"] != 0:
                    print(record["error_tail"][-800:], file=sys.stderr)
    return trials


def summarise(trials: list[dict]) -> dict:
    """Median wall seconds and final accuracy per framework (successful trials) and the ratio."""
    out: dict = {"median_wall_s": {}, "median_final_accuracy": {}, "successful_trials": {}}
    for fw in FRAMEWORKS:
        ok = [t for t in trials if t["framework"] == fw and t["exit_code"] == 0]
        out["successful_trials"][fw] = len(ok)
        out["median_wall_s"][fw] = round(statistics.median(t["wall_s"] for t in ok), 3) if ok else None
        accs = [t["final_accuracy"] for t in ok if t.get("final_accuracy") is not None]
        out["median_final_accuracy"][fw] = round(statistics.median(accs), 4) if accs else None
    med = out["median_wall_s"]
    out["ratio_raysim_over_flower"] = round(med["raysim"] / med["flower"], 3) if all(med.values()) else None
    return out


def versions(python: str) -> dict:
    """Package versions of the environment of `python` (errors recorded, not raised)."""
    try:
        proc = subprocess.run([python, "-c", VERSIONS_CODE], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return {"error": str(exc)}


def machine() -> dict:
    info = {"platform": platform.platform(), "hostname": platform.node(), "cpu_count": os.cpu_count()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (AttributeError, OSError, ValueError):
        pass
    return info


def raysim_python(raysim: str) -> str:
    """The interpreter next to the `raysim` script (its virtualenv), else this one."""
    candidate = Path(raysim).resolve().parent / "python"
    return str(candidate) if candidate.exists() else sys.executable


def print_table(trials: list[dict], summary: dict) -> None:
    print(f"\n{'trial':>5}  {'framework':<8} {'wall s':>8} {'accuracy':>9} {'load before/after':>20}")
    for t in trials:
        acc = t.get("final_accuracy")
        acc_s = f"{acc:.4f}" if isinstance(acc, float) else ("-" if t["exit_code"] == 0 else "FAILED")
        load = f"{t['load_before'][0]:.2f} / {t['load_after'][0]:.2f}"
        print(f"{t['trial']:>5}  {t['framework']:<8} {t['wall_s']:>8.1f} {acc_s:>9} {load:>20}")
    med, ratio = summary["median_wall_s"], summary["ratio_raysim_over_flower"]
    print("median wall s: " + ", ".join(f"{fw} {med[fw]}" for fw in FRAMEWORKS)
          + f"; raysim/flower = {ratio}")


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="raysim vs Flower wall-clock on the tiny workload")
    p.add_argument("--trials", type=int, default=5, help="interleaved trials (one process per framework each)")
    p.add_argument("--json", help="write the raw trials, medians and ratio here")
    p.add_argument("--raysim", default=str(REPO / ".venv" / "bin" / "raysim"), help="the raysim CLI")
    p.add_argument("--flower-python", default=str(HERE / ".venv" / "bin" / "python"),
                   help="Python of the Flower virtualenv (setup.sh)")
    p.add_argument("--config", default=str(HERE / "tiny.yaml"), help="run config shared by both sides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to both sides (repeatable), e.g. train.lr=0.005")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a trial process is killed")
    args = p.parse_args(argv)
    args.config = str(Path(args.config).resolve())
    for path in (args.raysim, args.flower_python, args.config):
        if not Path(path).exists():
            p.error(f"not found: {path} (run benchmarks/flower/setup.sh for the Flower virtualenv)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    env_versions = {"raysim_env": versions(raysim_python(args.raysim)), "flower_env": versions(args.flower_python)}
    trials = run_trials(args)
    summary = summarise(trials)
    result = {"workload": "tiny", "comparison": "raysim run vs Flower simulation, wall-clock per fresh process",
              "date": started.isoformat(timespec="seconds"),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": env_versions, "config": args.config, "overrides": args.set,
              "config_text": Path(args.config).read_text(), "num_trials": args.trials, **summary, "trials": trials}
    print_table(trials, summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(summary["successful_trials"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
