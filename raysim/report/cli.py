"""`raysim report DIR`: the entry point `make_report` and the subcommand. With `--claims FILE`, DIR is the
root that holds one folder per sweep and the output is one document, reproduction.md (`raysim.report.claims`)."""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path
from typing import Callable

from raysim.report.load import directory_kind
from raysim.storage import RunStorage

CLAIMS_OUT = "reproduction"            # default output folder of --claims, inside ROOT


def make_report(path: "str | os.PathLike | RunStorage", out: "str | os.PathLike | None" = None) -> "Path | str":
    """Write the report of a run or sweep directory (a local path or a URI such as s3://bucket/sweep) into
    `out` (a local folder or a URI; default DIR/report). Returns report.md: a Path on local disk, else its URI."""
    dest, _ = write_report(path, out)
    return dest.local_path("report.md") if dest.is_local else dest.uri("report.md")


def write_report(path: "str | os.PathLike | RunStorage",
                 out: "str | os.PathLike | None" = None) -> tuple[RunStorage, list[str]]:
    """Write the report; returns its folder and the names of the PNGs in it."""
    src = RunStorage.of(path)
    kind = directory_kind(src)
    dest = RunStorage.of(out) if out else src.child("report")
    return dest, _write_into(dest, lambda folder: _render(kind, src, folder))


def write_claims_report(root: "str | os.PathLike | RunStorage", claims: "str | os.PathLike",
                        out: "str | os.PathLike | None" = None) -> tuple[RunStorage, list[str]]:
    """Write OUT/reproduction.md (default ROOT/reproduction/) checking the claims of the file `claims` against
    the sweeps under ROOT; returns its folder and the names of the PNGs in it."""
    from raysim.report.claims import claims_report, shown_child, write_document

    src = RunStorage.of(root)
    shown = str(root) if not isinstance(root, RunStorage) else root.uri()
    results = claims_report(src, claims, shown)          # every check before anything is written
    dest = RunStorage.of(out) if out else src.child(CLAIMS_OUT)
    command = " ".join(["raysim report", shlex.quote(shown), "--claims", shlex.quote(str(claims)),
                        "--out", shlex.quote(str(out) if out else shown_child(src, shown, CLAIMS_OUT))])
    return dest, _write_into(dest, lambda folder: write_document(results, folder, shown, str(claims), command))


def _write_into(dest: RunStorage, render: Callable[[Path], object]) -> list[str]:
    """Run `render` on a local folder: `dest` itself, or, for a folder in an object store, a temporary one
    whose files are then uploaded. Returns the names of the PNGs written."""
    if dest.is_local:
        folder = dest.local_path()
        folder.mkdir(parents=True, exist_ok=True)
        render(folder)
        return sorted(p.name for p in folder.glob("*.png"))
    with tempfile.TemporaryDirectory(prefix="raysim-report-") as tmp:
        render(Path(tmp))
        for file in sorted(Path(tmp).iterdir()):
            dest.write_bytes(file.name, file.read_bytes())
        return sorted(p.name for p in Path(tmp).glob("*.png"))


def _render(kind: str, src: RunStorage, folder: Path) -> None:
    from raysim.report.run import run_report
    from raysim.report.sweep import sweep_report

    (sweep_report if kind == "sweep" else run_report)(src, folder)


def cmd_report(args) -> int:
    if args.claims:
        dest, pngs = write_claims_report(args.dir, args.claims, args.out)
        from raysim.report.claims import DOCUMENT as name
    else:
        dest, pngs = write_report(args.dir, args.out)
        name = "report.md"
    print(f"report: {dest.uri(name)}" + (f"  ({', '.join(pngs)})" if pngs else ""))
    return 0


def add_cli(subparsers, add_common) -> None:
    p = subparsers.add_parser("report", help="plots + markdown summary of a run or sweep directory, or (--claims) "
                                             "the verdicts on the papers' claims over a folder of sweeps")
    p.add_argument("dir", help="a run directory (rounds.parquet) or a sweep directory (trials.parquet): a local "
                               "path or a URI such as s3://bucket/prefix; with --claims, the folder holding one "
                               "folder per sweep (e.g. runs/reproduce)")
    p.add_argument("--out", metavar="DIR", help="where to write report.md (reproduction.md with --claims) and the "
                                                "PNGs: a local folder or a URI (default DIR/report, with --claims "
                                                f"DIR/{CLAIMS_OUT})")
    p.add_argument("--claims", metavar="FILE", help="a claims file (e.g. experiments/reproduce/claims.yaml): "
                                                    "check each claim against DIR/<its sweep> by paired "
                                                    "comparisons across seeds and write one document")
    p.set_defaults(func=cmd_report)
