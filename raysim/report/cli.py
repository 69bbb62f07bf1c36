"""`raysim report DIR`: the entry point `make_report` and the subcommand."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from raysim.report.load import directory_kind
from raysim.storage import RunStorage


def make_report(path: "str | os.PathLike | RunStorage", out: "str | os.PathLike | None" = None) -> "Path | str":
    """Write the report of a run or sweep directory (a local path or a URI such as s3://bucket/sweep) into
    `out` (a local folder or a URI; default DIR/report). Returns report.md: a Path on local disk, else its URI."""
    dest, _ = write_report(path, out)
    return dest.local_path("report.md") if dest.is_local else dest.uri("report.md")


def write_report(path: "str | os.PathLike | RunStorage",
                 out: "str | os.PathLike | None" = None) -> tuple[RunStorage, list[str]]:
    """Write the report; returns its folder and the names of the PNGs in it. The figures are drawn on local
    disk: into the folder itself, or, for a folder in an object store, into a temporary one then uploaded."""
    src = RunStorage.of(path)
    kind = directory_kind(src)
    dest = RunStorage.of(out) if out else src.child("report")
    if dest.is_local:
        folder = dest.local_path()
        folder.mkdir(parents=True, exist_ok=True)
        return dest, _render(kind, src, folder)
    with tempfile.TemporaryDirectory(prefix="raysim-report-") as tmp:
        pngs = _render(kind, src, Path(tmp))
        for file in sorted(Path(tmp).iterdir()):
            dest.write_bytes(file.name, file.read_bytes())
    return dest, pngs


def _render(kind: str, src: RunStorage, folder: Path) -> list[str]:
    from raysim.report.run import run_report
    from raysim.report.sweep import sweep_report

    (sweep_report if kind == "sweep" else run_report)(src, folder)
    return sorted(p.name for p in folder.glob("*.png"))


def cmd_report(args) -> int:
    dest, pngs = write_report(args.dir, args.out)
    print(f"report: {dest.uri('report.md')}" + (f"  ({', '.join(pngs)})" if pngs else ""))
    return 0


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser("report", help="plots + markdown summary of a run or sweep directory")
    p.add_argument("dir", help="a run directory (rounds.parquet) or a sweep directory (trials.parquet): a local "
                               "path or a URI such as s3://bucket/prefix")
    p.add_argument("--out", metavar="DIR", help="where to write report.md and the PNGs: a local folder or a URI "
                                                "(default DIR/report)")
    p.set_defaults(func=cmd_report)
