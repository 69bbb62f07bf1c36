"""`raysim report ROOT --claims FILE`: paired comparisons across seeds and a verdict per claim. The sweep
folders are written here as raysim.tune writes them (sweep.yaml, trials.parquet, trials/<name>/rounds.parquet),
with metric values chosen by each test; no Ray."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysim.config import ConfigError
from raysim.metrics import ROUND_SCHEMA, RunWriter
from raysim.records import PERSONAL_METRICS
from raysim.report.claims import claims_report, write_document
from raysim.report.claims_spec import load_claims
from raysim.storage import RunStorage
from raysim.tune.spec import grid_combinations, load_sweep
from conftest_s3 import s3_server  # noqa: F401 - the fixture
from raysim.tune.table import RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[2]
REPRODUCE = REPO / "experiments" / "reproduce"
PNG = b"\x89PNG\r\n\x1a\n"


def write_trial(run_dir: Path, rounds: dict[str, list]) -> None:
    """A completed run directory whose rounds.parquet has the given per-round columns."""
    writer = RunWriter(run_dir)
    n = len(next(iter(rounds.values())))
    for i in range(n):
        writer.add_round({"round": i + 1, **{k: v[i] for k, v in rounds.items()}}, [])
    writer.storage.write_text("summary.json", json.dumps({"status": "completed"}))


def write_sweep(root: Path, name: str, space: dict[str, list], trials: list[dict]) -> Path:
    """A sweep folder: sweep.yaml with `space`, and one trials.parquet row per entry of `trials` (its swept
    values, seed, status and final metrics; a 'rounds' entry becomes the trial's rounds.parquet)."""
    sweep = root / name
    (sweep / "trials").mkdir(parents=True)
    (sweep / "sweep.yaml").write_text(yaml.safe_dump({
        "name": name, "search_space": {k: {"grid_search": v} for k, v in space.items()}, "seeds": [0, 1, 2]}))
    rows = []
    for i, t in enumerate(trials):
        t = dict(t)
        name_i = f"{i:04d}"
        write_trial(sweep / "trials" / name_i, t.pop("rounds", {"accuracy": [0.5]}))
        row = {"trial": name_i, "trial_id": f"x_{i:05d}", **{k: None for k in RESULT_COLUMNS}}
        row.update({k: json.dumps(v) if isinstance(v, dict) else v for k, v in t.items()})
        row.update(status=t.get("status", "completed"), run_dir=str(sweep / "trials" / name_i))
        rows.append(row)
    pd.DataFrame(rows).to_parquet(sweep / "trials.parquet", index=False)
    return sweep


def write_claims(path: Path, claims: list[dict]) -> Path:
    text = {"paper": "P (X et al., 2025)", "setting": "s", "paper_result": "r", "scale": "small"}
    path.write_text(yaml.safe_dump({"claims": [{**text, "higher_is_better": True, **c} for c in claims]},
                                   sort_keys=False))
    return path


ACC = {"x": [0.80, 0.82, 0.81], "y": [0.70, 0.75, 0.78], "z": [0.60, 0.65, 0.90], "w": [0.90, 0.95, 0.85],
       "v": [0.704, 0.744, 0.785], "t": [0.50, 0.60, 0.70], "u": [0.10, 0.20, 0.30]}


def toy_sweep(root: Path) -> Path:
    """Aggregators x..u, seeds 0-2, final accuracy ACC[agg][seed]; u's seed 2 failed."""
    trials = [{"aggregator.name": a, "seed": s, "accuracy": acc, "status": "error" if (a, s) == ("u", 2)
               else "completed"} for a, accs in ACC.items() for s, acc in enumerate(accs)]
    return write_sweep(root, "toy", {"aggregator.name": list(ACC)}, trials)


def cmp(a: str, b: str, expect: str, **kw) -> dict:
    return {"a": {"aggregator.name": a}, "b": {"aggregator.name": b}, "expect": expect, **kw}


TOY_CLAIMS = [
    {"id": "up", "sweep": "toy", "metric": "accuracy", "comparisons": [cmp("x", "y", "greater")]},
    {"id": "mixed", "sweep": "toy", "metric": "accuracy",
     "comparisons": [cmp("x", "y", "greater"), cmp("x", "w", "greater")]},
    {"id": "weak", "sweep": "toy", "metric": "accuracy", "comparisons": [cmp("x", "z", "greater")]},
    {"id": "down", "sweep": "toy", "metric": "accuracy", "comparisons": [cmp("y", "x", "less")]},
    {"id": "same", "sweep": "toy", "metric": "accuracy",
     "comparisons": [cmp("v", "y", "similar", tolerance=0.01)]},
    {"id": "apart", "sweep": "toy", "metric": "accuracy",
     "comparisons": [cmp("x", "y", "similar", tolerance=0.01)]},
    {"id": "atleast", "sweep": "toy", "metric": "accuracy",
     "comparisons": [cmp("y", "v", "at_least", tolerance=0.01), cmp("t", "y", "at_least", tolerance=0.01)]},
    {"id": "few", "sweep": "toy", "metric": "accuracy", "comparisons": [cmp("u", "y", "greater")]},
    {"id": "absent", "sweep": "never_ran", "metric": "accuracy", "comparisons": [cmp("x", "y", "greater")]},
]


def diffs(a: str, b: str, seeds=(0, 1, 2)) -> list[float]:
    return [ACC[a][s] - ACC[b][s] for s in seeds]


def test_each_verdict_branch_and_the_paired_differences(tmp_path):
    toy_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "claims.yaml", TOY_CLAIMS)
    results = {r.claim.id: r for r in claims_report(RunStorage.of(tmp_path / "root"), claims)}
    verdicts = {k: r.verdict for k, r in results.items()}
    assert verdicts == {"up": "reproduced", "mixed": "contradicted", "weak": "not reproduced at this scale",
                        "down": "reproduced", "same": "reproduced", "apart": "not reproduced at this scale",
                        "atleast": "contradicted", "few": "not run", "absent": "not run"}
    up = results["up"].outcomes[0].pairs
    assert list(up["seed"]) == [0, 1, 2] and list(up["diff"]) == pytest.approx(diffs("x", "y"))
    assert list(up["a"]) == ACC["x"] and list(up["b"]) == ACC["y"]
    assert [o.verdict for o in results["mixed"].outcomes] == ["reproduced", "contradicted"]
    assert [o.verdict for o in results["atleast"].outcomes] == ["reproduced", "contradicted"]
    assert list(results["same"].outcomes[0].pairs["diff"]) == pytest.approx(diffs("v", "y"))
    assert "2 seed(s)" in results["few"].outcomes[0].reason                   # u's seed 2 failed
    assert results["absent"].outcomes == [] and "never_ran" in results["absent"].reason


def test_the_document_has_the_summary_the_paired_tables_and_a_plot_per_claim(tmp_path):
    toy_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "claims.yaml", TOY_CLAIMS)
    results = claims_report(RunStorage.of(tmp_path / "root"), claims, "runs/x")
    out = tmp_path / "out"
    out.mkdir()
    doc = write_document(results, out, "runs/x", "claims.yaml", "raysim report runs/x --claims c.yaml --out out")
    text = doc.read_text()
    assert doc.name == "reproduction.md" and "raysim report runs/x --claims c.yaml --out out" in text
    summary = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.rsplit("|", 2)[-2].strip() for line in summary] == [
        f"**{r.verdict}**" for r in results]
    d = diffs("x", "y")
    mean = sum(d) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in d) / 2)
    assert f"x − y: {mean:+.4f} ± {std:.4f} (3 pairs)" in summary[0]
    for s in range(3):
        assert f"| {s} | {ACC['x'][s]:.4f} | {ACC['y'][s]:.4f} | {d[s]:+.4f} |" in text
    assert f"| mean ± std | {_ms(ACC['x'])} | {_ms(ACC['y'])} | {mean:+.4f} ± {std:.4f} |" in text
    assert "**Verdict: contradicted** — comparison 2 (x vs w)" in text
    assert "**Verdict: not run** — no trials.parquet in `runs/x/never_ran`" in text
    for cid in ("up", "mixed", "weak", "down", "same", "apart", "atleast"):
        png = out / f"claim-{cid}.png"
        assert png.read_bytes()[:8] == PNG and f"![{cid}](claim-{cid}.png)" in text
    assert not (out / "claim-absent.png").exists() and not (out / "claim-few.png").exists()


def _ms(vals: list[float]) -> str:
    m = sum(vals) / len(vals)
    return f"{m:.4f} ± {math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)):.4f}"


SECTIONS = [{"name": "p"}, {"name": "q", "lam": 0.0}, {"name": "q", "lam": 0.1}]


def section_sweep(root: Path) -> tuple[Path, dict]:
    """A whole-section sweep (JSON `aggregator` column) x train.lr, with per-round bytes_up and accuracy."""
    trials, rounds_of = [], {}
    for k, sec in enumerate(SECTIONS):
        for lr in (0.1, 0.2):
            for s in range(3):
                up = [1000 * (k + 1) + 10 * s + j for j in range(3)]
                acc = [0.1 * k + lr + 0.01 * s + 0.02 * j for j in range(3)]
                rounds_of[(k, lr, s)] = {"bytes_up": up, "accuracy": acc}
                trials.append({"aggregator": sec, "train.lr": lr, "seed": s, "rounds": rounds_of[(k, lr, s)]})
    return write_sweep(root, "sec", {"aggregator": SECTIONS, "train.lr": [0.1, 0.2]}, trials), rounds_of


def test_json_section_keys_rounds_metrics_pairing_and_best_of(tmp_path):
    _, rounds_of = section_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", [
        {"id": "bytes", "sweep": "sec", "metric": "rounds:bytes_up:mean", "higher_is_better": False,
         "comparisons": [{"a": {"aggregator.name": "p"}, "b": {"aggregator.name": "q", "aggregator.lam": 0.1},
                          "expect": "less"}]},
        {"id": "best", "sweep": "sec", "metric": "rounds:accuracy:max",
         "comparisons": [{"a": {"aggregator.name": "q", "aggregator.lam": 0.0}, "b": {"aggregator.name": "p"},
                          "expect": "greater", "best_of": ["train.lr"]}]}])
    raw = yaml.safe_load(claims.read_text())
    raw["claims"].append({**raw["claims"][1], "id": "lowest", "higher_is_better": False})
    claims.write_text(yaml.safe_dump(raw))
    results = claims_report(RunStorage.of(tmp_path / "root"), claims)
    assert results[2].outcomes[0].chosen == {"a": {"train.lr": 0.1}, "b": {"train.lr": 0.1}}
    pairs = results[0].outcomes[0].pairs                    # paired by seed and train.lr: 6 pairs
    assert len(pairs) == 6 and results[0].verdict == "reproduced"
    for _, p in pairs.iterrows():
        mean = lambda k: sum(rounds_of[(k, p["train.lr"], p["seed"])]["bytes_up"]) / 3  # noqa: E731
        assert p["diff"] == pytest.approx(mean(0) - mean(2))
    best = results[1].outcomes[0]
    assert best.chosen == {"a": {"train.lr": 0.2}, "b": {"train.lr": 0.2}} and len(best.pairs) == 3
    assert list(best.pairs["diff"]) == pytest.approx(
        [max(rounds_of[(1, 0.2, s)]["accuracy"]) - max(rounds_of[(0, 0.2, s)]["accuracy"]) for s in range(3)])


@pytest.mark.parametrize("change, key", [
    ({"comparisons": [cmp("x", "y", "greater") | {"a": {"aggregator.nme": "x"}}]}, "aggregator.nme"),
    ({"metric": "exact_matc"}, "exact_matc"),
    ({"metric": "rounds:no_such:mean"}, "no_such"),
    ({"metric": "rounds:accuracy:median"}, "metric"),
    ({"comparisons": [cmp("x", "y", "bigger")]}, "expect"),
    ({"comparisons": [cmp("x", "y", "similar")]}, "tolerance"),
    ({"comparisons": [cmp("x", "y", "greater") | {"a": {"seed": 0}}]}, "selects several completed trials"),
    ({"discussion": ""}, "discussion"),
])
def test_claims_naming_what_the_sweep_lacks_are_refused_naming_the_key(tmp_path, change, key):
    toy_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", [{"id": "c", "sweep": "toy", "metric": "accuracy",
                                                 "comparisons": [cmp("x", "y", "greater")], **change}])
    with pytest.raises(ConfigError, match=re.escape(key)):
        claims_report(RunStorage.of(tmp_path / "root"), claims)


def test_a_claims_discussion_is_shown_under_its_verdict(tmp_path):
    from raysim.report.claims import write_document

    toy_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", [{**TOY_CLAIMS[0], "discussion": "Why:\n  because."}])
    results = claims_report(RunStorage.of(tmp_path / "root"), claims)
    (tmp_path / "out").mkdir()
    text = write_document(results, tmp_path / "out", "root", "c.yaml", "raysim report").read_text()
    verdict = text.index("**Verdict:", text.index(f"## `{TOY_CLAIMS[0]['id']}`"))
    assert text.index("**Discussion.** Why: because.") > verdict


def test_cli_writes_the_document_and_exits_2_on_a_bad_claim(tmp_path):
    toy_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", TOY_CLAIMS[:1])
    run = lambda *args: subprocess.run([sys.executable, "-m", "raysim", "report", *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, cwd=REPO, timeout=300)
    ok = run(tmp_path / "root", "--claims", claims, "--out", tmp_path / "docs")
    assert ok.returncode == 0, ok.stderr
    text = (tmp_path / "docs" / "reproduction.md").read_text()
    assert "**reproduced**" in text and f"--claims {claims} --out {tmp_path / 'docs'}" in text
    bad = write_claims(tmp_path / "bad.yaml", [{**TOY_CLAIMS[0], "metric": "acuracy"}])
    for claims_arg, message in ((bad, "claims[0] (up).metric: acuracy is not a column"),
                                (tmp_path / "missing.yaml", "missing.yaml not found")):
        err = run(tmp_path / "root", "--claims", claims_arg)
        assert err.returncode == 2 and len(err.stderr.strip().splitlines()) == 1, err.stderr
        assert message in err.stderr
    assert not (tmp_path / "root" / "reproduction").exists()


# ---- the real claims file against the real sweep files ---------------------------------------------------

def sweep_files() -> dict[str, Path]:
    """Sweep folder name -> sweep file, from README.md's `raysim sweep FILE --out runs/reproduce/NAME` lines."""
    text = (REPRODUCE / "README.md").read_text()
    found = re.findall(r"raysim sweep (experiments/reproduce/\S+\.yaml)\s+--out runs/reproduce/(\w+)\n", text)
    return {name: REPO / file for file, name in found}


def test_claims_file_covers_every_sweep_and_parses():
    claims = load_claims(REPRODUCE / "claims.yaml")
    files = sweep_files()
    assert len(files) == 6 and {c.sweep for c in claims} == set(files)
    rounds_columns = set(ROUND_SCHEMA.names) | set(PERSONAL_METRICS)
    for c in claims:
        assert c.metric.column in (rounds_columns if c.metric.reducer else RESULT_COLUMNS), c.id


def test_every_comparison_pairs_three_seeds_on_what_its_sweep_would_write(tmp_path):
    """Trials tables as each sweep file's grid would produce (dict values as JSON), with arbitrary metric
    values: every comparison of claims.yaml must select and pair 3 seeds there."""
    for name, file in sweep_files().items():
        spec = load_sweep(file, check_data=False)
        trials = []
        for i, combo in enumerate(grid_combinations(spec)):
            metrics = {k: 0.5 + 0.01 * i for k in ("accuracy", "exact_match", "personalized_accuracy")}
            rounds = {"accuracy": [0.1, 0.2 + 0.01 * i], "deviation_rel": [1e-3, 1e-3 * i], "bytes_up": [100, i]}
            trials.append({**combo, **metrics, "rounds": rounds})
        assert len(trials) == spec.num_trials()
        write_sweep(tmp_path / "root", name, {k: v["grid_search"] for k, v in spec.search_space.items()}, trials)
    for r in claims_report(RunStorage.of(tmp_path / "root"), REPRODUCE / "claims.yaml"):
        assert r.verdict != "not run", (r.claim.id, [o.reason for o in r.outcomes])
        for o in r.outcomes:
            assert sorted(set(o.pairs["seed"])) == [0, 1, 2], (r.claim.id, o.label_a, o.label_b)



def test_trials_table_has_the_last_evaluated_value_of_the_metrics_claims_use(tmp_path):
    """exact_match and the personalised mean / 10th percentile: the last round where they were measured."""
    from raysim.tune.table import run_dir_metrics

    write_trial(tmp_path / "run", {"accuracy": [0.2, 0.4, None], "exact_match": [0.1, 0.3, None],
                                   "personalized_accuracy_mean": [0.5, None, 0.7],
                                   "personalized_accuracy_p10": [0.25, None, 0.35], "perplexity": [9.0, 7.0, 8.0]})
    row = run_dir_metrics(tmp_path / "run")
    assert row["status"] == "completed" and row["accuracy"] == 0.4
    assert (row["exact_match"], row["perplexity"]) == (0.3, 8.0)
    assert (row["personalized_accuracy_mean"], row["personalized_accuracy_p10"]) == (0.7, 0.35)
    assert list(RESULT_COLUMNS[:16]) == ["status", "rounds_done", "rounds", "accuracy", "loss", "deviation_rel",
                                         "max_deviation_rel", "best_accuracy", "best_round", "personalized_accuracy",
                                         "train_loss", "bytes_up", "bytes_down", "wall_s", "run_dir", "error"]


def test_sweeps_and_document_in_an_object_store(s3_server, tmp_path):  # noqa: F811 - the fixture
    """ROOT as a URI: trials.parquet and each trial's rounds.parquet are read from the bucket (the run_dir
    paths recorded locally are gone), and the document goes next to the sweeps by default."""
    import shutil

    import pyarrow.fs as pafs

    from raysim.report.cli import write_claims_report

    section_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", [
        {"id": "bytes", "sweep": "sec", "metric": "rounds:bytes_up:mean", "higher_is_better": False,
         "comparisons": [{"a": {"aggregator.name": "p"}, "b": {"aggregator.name": "q", "aggregator.lam": 0.1},
                          "expect": "less"}]}])
    local = claims_report(RunStorage.of(tmp_path / "root"), claims)[0].outcomes[0].pairs
    uri = s3_server.uri()
    root = RunStorage.of(uri)
    pafs.copy_files(str(tmp_path / "root"), root.path(), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=root.fs)
    shutil.rmtree(tmp_path / "root")
    dest, pngs = write_claims_report(uri, claims)
    assert dest.uri() == root.uri("reproduction") and pngs == ["claim-bytes.png"]
    assert dest.read_bytes("claim-bytes.png")[:8] == PNG
    text = dest.read_text("reproduction.md")
    assert "**reproduced**" in text and f"--out '{root.uri('reproduction')}'" in text
    assert f"`{root.child('sec').uri()}`" in text
    remote = claims_report(root, claims)[0].outcomes[0].pairs
    pd.testing.assert_frame_equal(remote, local)
