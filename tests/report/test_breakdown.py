"""A claim's `breakdown:` in `raysim report ROOT --claims FILE`: per-module deviation from each trial's
modules.parquet and per-slot dilution from each trial's updates/, per setting, mean ± std over seeds. The sweep
folders are written here by hand (trials.parquet, trials/<name>/rounds.parquet and the breakdown's files) and
every expected number is computed in the test from the values it wrote; no Ray."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.numpy import save_file

from raysim.config import ConfigError
from raysim.report.breakdown import module_label, module_order, setting_label
from raysim.report.claims import claims_report, write_document
from raysim.report.plots import breakdown_plot
from raysim.storage import RunStorage
from conftest_s3 import s3_server  # noqa: F401 - the fixture

PNG = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
MODULES = ["bert.encoder.layer.10.attention.self.query", "bert.encoder.layer.2.attention.self.value",
           "bert.encoder.layer.2.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
IN_LAYER_ORDER = [MODULES[3], MODULES[2], MODULES[1], MODULES[0]]
BASE = {"fedex": 1e-8, "fedit": 0.1}                    # deviation scale per aggregator: > 2 decades apart


def write_sweep(root: Path, trials: list[dict]) -> Path:
    """trials.parquet (trial, seed, status, run_dir, aggregator.name, accuracy) and a run directory with a
    one-round rounds.parquet per trial; returns the sweep folder."""
    sweep = root / "sw"
    rows = []
    for i, t in enumerate(trials):
        run = sweep / "trials" / f"{i:04d}"
        (run / "rounds.parquet").mkdir(parents=True)
        pq.write_table(pa.table({"round": [1], "accuracy": [t["accuracy"]]}),
                       run / "rounds.parquet" / "round-000001.parquet")
        rows.append({"trial": f"{i:04d}", "seed": t["seed"], "status": t.get("status", "completed"),
                     "run_dir": str(run), "aggregator.name": t["agg"], "accuracy": t["accuracy"]})
    pd.DataFrame(rows).to_parquet(sweep / "trials.parquet", index=False)
    (sweep / "sweep.yaml").write_text(yaml.safe_dump({"name": "sw", "search_space": {
        "aggregator.name": {"grid_search": sorted({t["agg"] for t in trials})}}}))
    return sweep


def write_claims(path: Path, breakdown, a: str, b: str) -> Path:
    claim = {"id": "c", "paper": "P", "sweep": "sw", "setting": "s", "paper_result": "r", "scale": "small",
             "metric": "accuracy", "higher_is_better": True,
             "comparisons": [{"a": {"aggregator.name": a}, "b": {"aggregator.name": b}, "expect": "greater"}]}
    plain = {**claim, "id": "plain"}
    path.write_text(yaml.safe_dump({"claims": [{**claim, "breakdown": breakdown}, plain]}))
    return path


# ---- per_module_deviation --------------------------------------------------------------------------------

def deviation(agg: str, seed: int, rnd: int, module: str) -> float:
    layer = int(re.search(r"\d+", module).group())
    return BASE[agg] * (1 + layer) * (1 + 0.5 * seed) * rnd * (2.0 if module.endswith("value") else 1.0)


def write_modules(run: Path, agg: str, seed: int, rounds=(2, 4)) -> None:
    """modules.parquet with one part per round where the deviation was measured (rounds 2 and 4)."""
    (run / "modules.parquet").mkdir()
    for rnd in rounds:
        pq.write_table(pa.table({
            "round": pa.array([rnd] * len(MODULES), pa.int64()), "module": MODULES,
            "deviation_rel": [deviation(agg, seed, rnd, m) for m in MODULES],
            "ideal_norm": [1.0 + k for k in range(len(MODULES))]}),
            run / "modules.parquet" / f"round-{rnd:06d}.parquet")


def module_sweep(root: Path, with_modules: bool = True) -> Path:
    """fedex and fedit at seeds 0-2; fedit's seed 2 has no modules.parquet; a failed fedex trial (seed 0) has
    huge deviations that must not count."""
    trials = [{"agg": a, "seed": s, "accuracy": 0.5 + 0.1 * s + (0.05 if a == "fedex" else 0.0)}
              for a in ("fedex", "fedit") for s in SEEDS] + [{"agg": "fedex", "seed": 0, "accuracy": 0.0,
                                                              "status": "error"}]
    sweep = write_sweep(root, trials)
    for i, t in enumerate(trials):
        if with_modules and (t["agg"], t["seed"]) != ("fedit", 2):
            write_modules(sweep / "trials" / f"{i:04d}", t["agg"], t["seed"] + (100 if i == 6 else 0))
    return sweep


def expected_modules(agg: str, seeds) -> dict[str, tuple[float, float]]:
    """Module -> (mean, sample std) over `seeds` of each trial's mean deviation over rounds 2 and 4."""
    out = {}
    for m in MODULES:
        per_trial = [(deviation(agg, s, 2, m) + deviation(agg, s, 4, m)) / 2 for s in seeds]
        out[m] = (statistics.mean(per_trial), statistics.stdev(per_trial))
    return out


def test_per_module_deviation_per_setting_in_layer_order_with_table_and_figure(tmp_path):
    module_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", "per_module_deviation", "fedex", "fedit")
    results = claims_report(RunStorage.of(tmp_path / "root"), claims)
    b = results[0].breakdown
    assert results[0].verdict == results[1].verdict and results[1].breakdown is None
    pd.testing.assert_frame_equal(results[0].outcomes[0].pairs, results[1].outcomes[0].pairs)
    assert b.settings == ["fedex", "fedit"] and b.seeds == {"fedex": 3, "fedit": 2} and b.missing == 1
    assert b.rows == IN_LAYER_ORDER
    want = {"fedex": expected_modules("fedex", SEEDS), "fedit": expected_modules("fedit", (0, 1))}
    for agg, per_module in want.items():
        for m, (mean, std) in per_module.items():
            vals = b.values[(m, agg)]
            assert statistics.mean(vals) == pytest.approx(mean) and statistics.stdev(vals) == pytest.approx(std)

    out = tmp_path / "out"
    out.mkdir()
    text = write_document(results, out, "root", "c.yaml", "raysim report").read_text()
    section = text.split("### Breakdown", 1)[1].split("## `plain`")[0]
    assert "| module | fedex (n=3) | fedit (n=2) |" in section
    for m in MODULES:
        cells = [f"{want[a][m][0]:.2e} ± {want[a][m][1]:.2e}" for a in ("fedex", "fedit")]
        assert f"| {module_label(m)} | {cells[0]} | {cells[1]} |" in section
    lines = section.splitlines()
    rows_at = [next(i for i, x in enumerate(lines) if x.startswith(f"| {module_label(m)} |")) for m in IN_LAYER_ORDER]
    assert rows_at == sorted(rows_at)
    assert "mean over its rounds of that module's deviation_rel" in section
    assert "Left out: 1 completed trial(s) without modules.parquet." in section
    assert (out / "claim-c-breakdown.png").read_bytes()[:8] == PNG
    assert "![c breakdown](claim-c-breakdown.png)" in section
    assert not (out / "claim-plain-breakdown.png").exists() and text.count("### Breakdown") == 1


def test_breakdown_figure_is_log_scale_only_when_values_span_more_than_two_decades(tmp_path):
    module_sweep(tmp_path / "root")
    results = claims_report(RunStorage.of(tmp_path / "root"),
                            write_claims(tmp_path / "c.yaml", "per_module_deviation", "fedex", "fedit"))
    b = results[0].breakdown
    fig = breakdown_plot("c", b)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and len(ax.get_legend().get_texts()) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == [module_label(m) for m in IN_LAYER_ORDER]
    b.values = {k: v for k, v in b.values.items() if k[1] == "fedit"}      # one setting: within 2 decades
    b.settings = ["fedit"]
    assert breakdown_plot("c", b).axes[0].get_yscale() == "linear"


def test_runs_without_modules_parquet_give_the_not_recorded_line(tmp_path):
    module_sweep(tmp_path / "root", with_modules=False)
    results = claims_report(RunStorage.of(tmp_path / "root"),
                            write_claims(tmp_path / "c.yaml", "per_module_deviation", "fedex", "fedit"))
    assert results[0].verdict == results[1].verdict == "reproduced"
    out = tmp_path / "out"
    out.mkdir()
    section = write_document(results, out, "root", "c.yaml", "x").read_text().split("### Breakdown", 1)[1]
    body = [line for line in section.split("## `plain`")[0].splitlines()[1:] if line.strip()]
    assert body == ["Not recorded: no completed trial of this sweep has modules.parquet (runs made before the "
                    "per-module deviation was recorded); rerun the sweep to get it."]
    assert not (out / "claim-c-breakdown.png").exists()


def test_module_names_and_setting_labels():
    decoder = ["model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.v_proj", "lm_head",
               "model.layers.0.self_attn.q_proj"]
    assert module_order(decoder) == [decoder[3], decoder[1], decoder[0], "lm_head"]
    assert [module_label(m) for m in module_order(decoder)] == ["layer 0 · q_proj", "layer 0 · v_proj",
                                                                "layer 1 · v_proj", "lm_head"]
    assert setting_label(["aggregator", "train.lr"], ('{"name": "lora_fair", "lam": 0.01}', 0.002)) \
        == "lora_fair, lam=0.01, lr=0.002"


# ---- slot_dilution ---------------------------------------------------------------------------------------

SCALE = 2.0
# client -> (weight, per-slot |A_k[j]|, per-slot |B_k[:, j]|); client-0 uploads rank 2, client-1 rank 4
CLIENTS = {0: (3.0, [1.0, 2.0], [1.0, 0.5]), 1: (1.0, [1.0, 1.0, 2.0, 3.0], [2.0, 1.0, 1.0, 1.0])}
GLOBAL = {"hetlora": [1.5, 1.0, 0.2, 0.3], "replication": [1.4, 1.1, 3.0, 5.0]}   # |A_g[j]|, |B_g[:, j]| = 1
SLOT_MODULES = {"base.layer.0.q": 1.0, "base.layer.1.q": 2.0}    # module -> factor on every B (norms x2)


def slot_factors(a_norms: list[float], b_norms: list[float], b_factor: float) -> dict[str, np.ndarray]:
    """A (r, 4) with row j = a_j e_j, B (3, r) with column j = b_j e_0: ‖A[j]‖ = a_j, ‖B[:, j]‖ = b_j."""
    r = len(a_norms)
    a, b = np.zeros((r, 4), np.float32), np.zeros((3, r), np.float32)
    for j in range(r):
        a[j, j] = a_norms[j]
        b[0, j] = b_norms[j] * b_factor
    return {"lora_A": a, "lora_B": b}


def write_updates(run: Path, agg: str, seed: int) -> None:
    """updates/round-0001/{client-0,client-1,global}.safetensors; the seed stretches the global slots."""
    rnd = run / "updates" / "round-0001"
    rnd.mkdir(parents=True)
    for cid, (weight, a_n, b_n) in CLIENTS.items():
        tensors = {f"{m}.{k}": v for m, f in SLOT_MODULES.items() for k, v in slot_factors(a_n, b_n, f).items()}
        save_file(tensors, str(rnd / f"client-{cid}.safetensors"), metadata={"weight": repr(weight),
                                                                             "scale": repr(SCALE)})
    g = [v * (1 + 0.1 * seed) for v in GLOBAL[agg]]
    tensors = {f"{m}.{k}": v for m, f in SLOT_MODULES.items() for k, v in slot_factors(g, [1.0] * 4, f).items()}
    save_file(tensors, str(rnd / "global.safetensors"), metadata={"scale": repr(SCALE)})


def expected_dilution(agg: str, seed: int) -> dict[str, float]:
    """The summary by hand: p = (0.75, 0.25); slots 0-1 owned by both (π = 1), slots 2-3 by client 1 only
    (π = 0.25); slot norm = scale·|a|·|b|, and the module mean multiplies both sides by (1 + 2)/2 = 1.5."""
    p = {0: 0.75, 1: 0.25}
    norm = {c: [SCALE * a * b for a, b in zip(a_n, b_n)] for c, (_, a_n, b_n) in CLIENTS.items()}
    owners = [p[0] * norm[0][j] + p[1] * norm[1][j] for j in (0, 1)] + [norm[1][2], norm[1][3]]
    glob = [SCALE * v * (1 + 0.1 * seed) for v in GLOBAL[agg]]
    kept = [g / o for g, o in zip(glob, owners)]
    return {"low_rank": 2.0, "pi_high_mean": 0.25, "kept_high_mean": (kept[2] + kept[3]) / 2,
            "kept_low_mean": (kept[0] + kept[1]) / 2, "global_norm_high_last": 1.5 * (glob[2] + glob[3]) / 2,
            "global_norm_low_last": 1.5 * (glob[0] + glob[1]) / 2}


def slot_sweep(root: Path, with_updates: bool = True) -> Path:
    trials = [{"agg": a, "seed": s, "accuracy": 0.6 + 0.1 * s + (0.05 if a == "replication" else 0.0)}
              for a in ("hetlora", "replication") for s in SEEDS]
    sweep = write_sweep(root, trials)
    if with_updates:
        for i, t in enumerate(trials):
            write_updates(sweep / "trials" / f"{i:04d}", t["agg"], t["seed"])
    return sweep


def test_slot_dilution_per_setting_mean_and_std_over_seeds(tmp_path):
    slot_sweep(tmp_path / "root")
    results = claims_report(RunStorage.of(tmp_path / "root"),
                            write_claims(tmp_path / "c.yaml", "slot_dilution", "replication", "hetlora"))
    b = results[0].breakdown
    assert results[0].verdict == results[1].verdict == "reproduced"
    assert b.settings == ["hetlora", "replication"] and b.seeds == {"hetlora": 3, "replication": 3}
    assert b.rows == ["low_rank", "pi_high_mean", "kept_high_mean", "kept_low_mean", "global_norm_high_last",
                      "global_norm_low_last"]
    for agg in b.settings:
        per_seed = [expected_dilution(agg, s) for s in SEEDS]
        for key in b.rows:
            assert b.values[(key, agg)] == pytest.approx([d[key] for d in per_seed], rel=1e-6), (agg, key)
    out = tmp_path / "out"
    out.mkdir()
    text = write_document(results, out, "root", "c.yaml", "x").read_text()
    section = text.split("### Breakdown", 1)[1].split("## `plain`")[0]
    assert "| quantity | hetlora (n=3) | replication (n=3) |" in section
    assert "| low_rank: first slot not every client owns | 2 ± 0 | 2 ± 0 |" in section
    kept = {a: [expected_dilution(a, s)["kept_high_mean"] for s in SEEDS] for a in b.settings}
    cells = [f"{statistics.mean(kept[a]):.4f} ± {statistics.stdev(kept[a]):.4f}" for a in b.settings]
    assert f"| kept, high slots: fraction surviving aggregation | {cells[0]} | {cells[1]} |" in section
    assert "per-run summary of `python -m raysim.dilution`" in section
    assert not (out / "claim-c-breakdown.png").exists()


def test_runs_without_updates_give_one_line(tmp_path):
    slot_sweep(tmp_path / "root", with_updates=False)
    results = claims_report(RunStorage.of(tmp_path / "root"),
                            write_claims(tmp_path / "c.yaml", "slot_dilution", "replication", "hetlora"))
    assert results[0].breakdown.values == {} and results[0].verdict == "reproduced"
    assert results[0].breakdown.note.startswith("Not recorded: no completed trial of this sweep has an updates/")


def test_slot_dilution_of_runs_in_an_object_store(s3_server, tmp_path):  # noqa: F811 - the fixture
    import pyarrow.fs as pafs

    slot_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", "slot_dilution", "replication", "hetlora")
    local = claims_report(RunStorage.of(tmp_path / "root"), claims)[0].breakdown
    root = RunStorage.of(s3_server.uri())
    pafs.copy_files(str(tmp_path / "root"), root.path(), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=root.fs)
    (tmp_path / "root").rename(tmp_path / "gone")          # the recorded run_dir paths no longer exist
    remote = claims_report(root, claims)[0].breakdown
    assert remote.seeds == local.seeds and remote.values.keys() == local.values.keys()
    for key, vals in local.values.items():
        assert remote.values[key] == pytest.approx(vals)


# ---- the claims file -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["per_module", "", 3])
def test_a_bad_breakdown_value_is_refused_naming_the_key_and_the_allowed_values(tmp_path, value):
    module_sweep(tmp_path / "root")
    claims = write_claims(tmp_path / "c.yaml", value, "fedex", "fedit")
    with pytest.raises(ConfigError, match=re.escape("claims[0] (c).breakdown")) as err:
        claims_report(RunStorage.of(tmp_path / "root"), claims)
    assert "per_module_deviation, slot_dilution" in str(err.value)
