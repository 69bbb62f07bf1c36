"""Per-slot dilution of a mixed-rank run, from the files of `output.save_updates: true`.

    python -m raysim.dilution runs/<run> [runs/<other> ...]      # table per run, high slots summarised

For every saved round (updates/round-NNNN/) and rank slot j (docs/algorithms.md, HetLoRA and Replication padding):

- `owners`: participants whose uploaded rank is > j; `pi`: their share Σ p_k of the client weights
  (the metadata `weight` of each client file). Zero-padding with p-weights scales slot j by π_j.
- `owners_norm`: p-weighted mean over the owners of ‖B̃_k[:, j]‖·‖A_k[j]‖ (= ‖B̃_k[:, j] A_k[j]‖_F, the
  size of the slot's rank-1 term), averaged over modules: what the owners sent.
- `global_norm`: the same for the global adapter after aggregation (global.safetensors).
- `kept` = global_norm / owners_norm: the fraction of the slot that survived this aggregation.
  Zero-padding gives about π_j² times the owners' agreement; replication gives the agreement alone
  (≤ 1, = 1 when the owners agree). Slots nobody owned that round have NaN.
- `pi2`: π_j², the exact zero-padding / replication norm ratio for the same uploads
  (A_zero[j] = π_j·A_rep[j] and B̃_zero[:, j] = π_j·B̃_rep[:, j]).

Only numpy, pandas and safetensors: no Ray, no model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _scales(meta_scale: str | None, modules: list[str]) -> dict[str, float]:
    if meta_scale is None or meta_scale == "":
        return {m: 1.0 for m in modules}
    try:
        return {m: float(meta_scale) for m in modules}
    except ValueError:
        value = json.loads(meta_scale)
    if isinstance(value, dict):
        return {m: float(value[m]) for m in modules}
    value = value[0] if isinstance(value, list) else value
    return _scales(value if isinstance(value, str) else str(value), modules)


def _slot_norms(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """‖s·B[:, j]‖·‖A[j]‖ per slot j."""
    return np.linalg.norm(scale * b.astype(np.float64), axis=0) * np.linalg.norm(a.astype(np.float64), axis=1)


def round_dilution(rnd_dir: Path) -> pd.DataFrame:
    """One row per slot of the global adapter for one updates/round-NNNN directory."""
    glob, gmeta = _load(rnd_dir / "global.safetensors")
    modules = sorted(k[: -len(".lora_A")] for k in glob if k.endswith(".lora_A"))
    gscale = _scales(gmeta.get("scale"), modules)
    r_max = glob[f"{modules[0]}.lora_A"].shape[0]
    clients = []
    for path in sorted(rnd_dir.glob("client-*.safetensors")):
        tensors, meta = _load(path)
        if f"{modules[0]}.lora_A" not in tensors or f"{modules[0]}.lora_B" not in tensors:
            continue                                   # methods that upload only one factor: no slot view
        clients.append((float(meta.get("weight", "nan")), tensors, _scales(meta.get("scale"), modules)))
    total_w = sum(w for w, _, _ in clients) or 1.0
    rows = []
    for j in range(r_max):
        owners = [(w / total_w, t, s) for w, t, s in clients if t[f"{modules[0]}.lora_A"].shape[0] > j]
        pi = float(sum(w for w, _, _ in owners))
        g_norm = float(np.mean([_slot_norms(glob[f"{m}.lora_A"], glob[f"{m}.lora_B"], gscale[m])[j]
                                for m in modules]))
        if owners:
            o_norm = float(np.mean([sum(w * _slot_norms(t[f"{m}.lora_A"], t[f"{m}.lora_B"], s[m])[j]
                                        for w, t, s in owners) / pi for m in modules]))
        else:
            o_norm = float("nan")
        rows.append({"slot": j, "owners": len(owners), "pi": pi, "pi2": pi * pi, "owners_norm": o_norm,
                     "global_norm": g_norm, "kept": g_norm / o_norm if o_norm > 0 else float("nan")})
    return pd.DataFrame(rows)


def dilution_table(run_dir: str | Path) -> pd.DataFrame:
    """All saved rounds of a run: columns round, slot, owners, pi, pi2, owners_norm, global_norm, kept."""
    run_dir = Path(run_dir)
    frames = []
    for rnd_dir in sorted((run_dir / "updates").glob("round-*")):
        df = round_dilution(rnd_dir)
        df.insert(0, "round", int(rnd_dir.name.split("-")[1]))
        frames.append(df)
    if not frames:
        raise FileNotFoundError(f"{run_dir}: no updates/round-*/ (run with output.save_updates: true)")
    return pd.concat(frames, ignore_index=True)


def summarise(table: pd.DataFrame, low_rank: int | None = None) -> dict[str, float]:
    """Mean over rounds of the slots ≥ low_rank (the high slots) and < low_rank (shared slots).

    low_rank defaults to the smallest rank any client uploaded (the first slot not everyone owns).
    """
    if low_rank is None:
        full = table[table["pi"] >= 1 - 1e-9]
        low_rank = int(full["slot"].max()) + 1 if len(full) else 0
    high, low = table[table["slot"] >= low_rank], table[table["slot"] < low_rank]
    owned = high[high["owners"] > 0]
    return {"low_rank": float(low_rank),
            "pi_high_mean": float(owned["pi"].mean()) if len(owned) else float("nan"),
            "kept_high_mean": float(owned["kept"].mean()) if len(owned) else float("nan"),
            "kept_low_mean": float(low["kept"].mean()) if len(low) else float("nan"),
            "global_norm_high_last": float(high[high["round"] == high["round"].max()]["global_norm"].mean())
            if len(high) else float("nan"),
            "global_norm_low_last": float(low[low["round"] == low["round"].max()]["global_norm"].mean())
            if len(low) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m raysim.dilution",
                                     description="Per-slot dilution of mixed-rank runs (saved with "
                                                 "output.save_updates: true); see the module docstring.")
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--low-rank", type=int, default=None,
                        help="first 'high' slot for the summary (default: the smallest uploaded rank)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for run in args.runs:
        try:
            table = dilution_table(run)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"== {run}")
        with pd.option_context("display.width", 160, "display.max_rows", 400):
            print(table.groupby("slot")[["owners", "pi", "pi2", "kept", "global_norm"]].mean().round(4))
        print({k: round(v, 4) for k, v in summarise(table, args.low_rank).items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
