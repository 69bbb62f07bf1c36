"""`raysim report DIR`: plots (PNG) and a markdown summary from a run or a sweep directory.

- run directory (rounds.parquet): accuracy.png, loss.png, deviation.png (when measured) and report.md
  with the final and best metrics, totals and the per-round table;
- sweep directory (trials.parquet): final accuracy vs non-IID alpha per aggregator, vs LoRA rank, vs
  number of clients (and vs any other swept key), final deviation_rel per aggregator, mean accuracy per
  round per aggregator, and report.md with a mean ± std over seeds table. A plot is drawn only for a
  dimension the sweep actually swept.

Everything is read from the Parquet/JSON/YAML files, so a report can be made on another machine. DIR is
a local path or a filesystem URI (s3://bucket/prefix, ...; read through `raysim.storage.RunStorage`).
Output goes to DIR/report/ unless --out is given (a local folder, or a URI: the files are uploaded).

With `--claims FILE`, DIR is a folder of sweeps (e.g. runs/reproduce) and the output is one document,
reproduction.md, with a verdict per paper claim of FILE from paired comparisons across seeds.

Modules: `load` (reading run and sweep directories), `fmt` (cell formatting), `tables` (markdown
tables and config facts), `plots` (matplotlib figures), `run` and `sweep` (the two reports), `claims_spec`
(the claims file), `paired` (pairing and verdicts), `claims` and `claims_md` (the reproduction document),
`cli`.
"""

from raysim.report.cli import add_cli, make_report

__all__ = ["add_cli", "make_report"]
