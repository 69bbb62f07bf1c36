"""Round checkpoints: `checkpoints/round-NNNN/` with state.safetensors + state.json (no pickle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file


def save_checkpoint(run_dir: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write atomically (tmp dir, then rename) and keep only the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"round-{int(meta['round']):04d}"
    tmp = root / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(root.glob("round-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return load_file(str(Path(path) / "state.safetensors")), json.loads((Path(path) / "state.json").read_text())
