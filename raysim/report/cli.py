"""`raysim report DIR`: the entry point `make_report` and the subcommand."""

from __future__ import annotations

from pathlib import Path

from raysim.report.load import directory_kind


def make_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report for a run or sweep directory; returns the path of report.md."""
    from raysim.report.run import run_report
    from raysim.report.sweep import sweep_report

    src = Path(path)
    kind = directory_kind(src)
    dest = Path(out) if out else src / "report"
    dest.mkdir(parents=True, exist_ok=True)
    return sweep_report(src, dest) if kind == "sweep" else run_report(src, dest)


def cmd_report(args) -> int:
    report = make_report(args.dir, args.out)
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    print(f"report: {report}" + (f"  ({', '.join(pngs)})" if pngs else ""))
    return 0


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser("report", help="plots + markdown summary of a run or sweep directory")
    p.add_argument("dir", help="a run directory (rounds.parquet) or a sweep directory (trials.parquet)")
    p.add_argument("--out", metavar="DIR", help="where to write report.md and the PNGs (default DIR/report)")
    p.set_defaults(func=cmd_report)
