"""A claim's breakdown (the claims file's `breakdown:` key): the numbers behind a verdict, per setting of the
claim's sweep (a setting: the values of the swept keys other than the seed), mean ± std over its seeds. A
breakdown never changes the verdict.

- per_module_deviation: each trial's modules.parquet (one row per round and adapter module where the
  deviation was measured: round, module, deviation_rel = ‖ΔW* − ΔW_applied‖/‖ΔW*‖, ideal_norm = ‖ΔW*‖_F).
  Per trial the mean over its rounds of each module's deviation_rel; then per setting and module the mean ±
  std over the seeds. Modules in layer order (the first integer of the name).
- slot_dilution: the summary of `raysim.dilution` (share of each rank slot that survived aggregation) of each
  trial's updates/ folder, written with `output.save_updates: true`.

Completed trials only. Trials without those files are left out and counted; when no trial has them the
breakdown is one line saying so (runs made before modules.parquet existed, or without save_updates).
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from raysim.report.claims_spec import PER_MODULE_DEVIATION, SLOT_DILUTION
from raysim.report.load import trial_run
from raysim.report.paired import json_value, label
from raysim.storage import RunStorage

NOT_RECORDED = {
    PER_MODULE_DEVIATION: "Not recorded: no completed trial of this sweep has modules.parquet (runs made before "
                          "the per-module deviation was recorded); rerun the sweep to get it.",
    SLOT_DILUTION: "Not recorded: no completed trial of this sweep has an updates/ folder (the runs were made "
                   "without `output.save_updates: true`).",
}
FILES = {PER_MODULE_DEVIATION: "modules.parquet", SLOT_DILUTION: "updates/"}
# the quantities of raysim.dilution.summarise, in its order, with what each one is
SLOT_ROWS = {
    "low_rank": "low_rank: first slot not every client owns",
    "pi_high_mean": "π, high slots: owners' share of the client weights",
    "kept_high_mean": "kept, high slots: fraction surviving aggregation",
    "kept_low_mean": "kept, shared slots (< low_rank)",
    "global_norm_high_last": "global slot norm, high slots, last saved round",
    "global_norm_low_last": "global slot norm, shared slots, last saved round",
}


@dataclass
class Breakdown:
    """Per row (a module, or a dilution quantity) and setting, one value per seed with data."""
    kind: str
    settings: list[str] = field(default_factory=list)          # column labels, in the sweep's trial order
    rows: list[str] = field(default_factory=list)              # modules in layer order, or SLOT_ROWS' keys
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)        # setting -> trials with data
    missing: int = 0                                           # completed trials without the files
    note: str = ""                                             # no table: why

    def add(self, setting: str, numbers: dict[str, float]) -> None:
        self.seeds[setting] = self.seeds.get(setting, 0) + 1
        for row, value in numbers.items():
            if not math.isnan(value):                  # e.g. no slot owned by only some clients
                self.values.setdefault((row, setting), []).append(float(value))

    def row_label(self, row: str) -> str:
        if self.kind == SLOT_DILUTION:
            return SLOT_ROWS[row]
        shorts = [module_label(r) for r in self.rows]
        return module_label(row) if len(set(shorts)) == len(shorts) else row


def layer_of(module: str) -> int | None:
    """The layer index of an adapter module: the first integer of its dotted name (None if there is none)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(found.group(1)) if found else None


def module_label(module: str) -> str:
    """'bert.encoder.layer.0.attention.self.query' -> 'layer 0 · query'."""
    layer, last = layer_of(module), module.rsplit(".", 1)[-1]
    return last if layer is None else f"layer {layer} · {last}"


def module_order(modules) -> list[str]:
    """Modules by layer (those without a layer index last), then by name."""
    return sorted(modules, key=lambda m: (math.inf if layer_of(m) is None else layer_of(m), m))


def compute(kind: str, sweep: RunStorage, df, dims: list[str]) -> Breakdown:
    """The breakdown `kind` of the completed trials of the trials table `df` (swept columns `dims`)."""
    per_trial = module_means if kind == PER_MODULE_DEVIATION else dilution_summary
    out = Breakdown(kind)
    for setting, trials in settings(df, dims):
        for _, t in trials.iterrows():
            run = trial_run(sweep, str(t["trial"]), t.get("run_dir"))
            numbers = per_trial(run) if run is not None else None
            if numbers is None:
                out.missing += 1
                continue
            if setting not in out.settings:
                out.settings.append(setting)
            out.add(setting, numbers)
    rows = {row for row, _ in out.values}
    out.rows = module_order(rows) if kind == PER_MODULE_DEVIATION else [k for k in SLOT_ROWS if k in rows]
    if not out.values:
        out.note = NOT_RECORDED[kind]
    return out


def settings(df, dims: list[str]) -> list[tuple[str, Any]]:
    """(label, completed trials) per distinct value of the swept columns other than the seed, in trial order."""
    done = df[df["status"] == "completed"]
    keys = [d for d in dims if d != "seed"]
    if not keys:
        return [("all trials", done)] if len(done) else []
    return [(setting_label(keys, values if isinstance(values, tuple) else (values,)), group)
            for values, group in done.groupby(keys, sort=False, dropna=False)]


def setting_label(keys: list[str], values: tuple) -> str:
    """'fedex', 'lora_fair, lam=0.01' (a JSON section column spelled out), 'fedit, num_clients=10'."""
    selector: dict[str, Any] = {}
    for key, value in zip(keys, values):
        section = json_value(value) if isinstance(value, str) else None      # a whole-section JSON column
        if not isinstance(section, dict):
            selector[key] = value.item() if hasattr(value, "item") else value
        else:
            selector.update({f"{key}.{k}": v for k, v in section.items()})
    return label(selector)


def module_means(run: RunStorage) -> dict[str, float] | None:
    """Module -> mean over the recorded rounds of its deviation_rel; None without modules.parquet."""
    if not run.exists("modules.parquet"):
        return None
    frame = run.read_parquet("modules.parquet", columns=["module", "deviation_rel"]).to_pandas()
    frame = frame.dropna(subset=["deviation_rel"])
    if not len(frame):
        return None
    return {str(k): float(v) for k, v in frame.groupby("module")["deviation_rel"].mean().items()}


def dilution_summary(run: RunStorage) -> dict[str, float] | None:
    """raysim.dilution's summary of the run's updates/ (copied to a temporary folder when not on local disk);
    None without saved rounds."""
    from raysim.dilution import dilution_table, summarise

    if not run.exists("updates"):
        return None
    try:
        if run.is_local:
            return summarise(dilution_table(run.local_path()))
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="raysim-updates-") as tmp:
            pafs.copy_files(run.path("updates"), f"{tmp}/updates", source_filesystem=run.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            return summarise(dilution_table(tmp))
    except FileNotFoundError:                  # an updates/ folder without round-*/ folders
        return None
