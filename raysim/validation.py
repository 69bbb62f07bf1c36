"""Server-side checks of client uploads, before anything is aggregated. Pure numpy, no Ray.

An upload is rejected when a trained factor or the head is not finite, when a factor or the head has
another shape than the one the client was sent, or when the change it carries (L2 norm over every
trained factor, end minus start) exceeds `federation.max_update_norm`. An accepted upload can be
clipped to `federation.clip_update_norm` (its change scaled down, as in DP-FedAvg's update clipping).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from raysim.lora.factors import Factors


def update_norm(start: Factors, end: Factors, train: frozenset[str]) -> float:
    """‖end − start‖₂ over every trained factor of every module (float64)."""
    total = 0.0
    for name, s in start.items():
        for key in sorted(train):
            if getattr(s, key) is None:
                continue
            diff = np.asarray(getattr(end[name], key), np.float64) - np.asarray(getattr(s, key), np.float64)
            total += float(np.sum(diff * diff))
    return math.sqrt(total)


def rejection_reason(start: Factors, end: Factors, train: frozenset[str], head_start: dict | None,
                     head_end: dict | None, max_norm: float | None) -> str | None:
    """Why the server refuses this upload, or None when it is acceptable."""
    if set(end) != set(start):
        return f"modules differ from the ones sent ({len(end)} vs {len(start)})"
    for name, s in start.items():
        for key in sorted(train):
            want, got = getattr(s, key), getattr(end[name], key)
            if want is None:
                continue
            if got is None or np.shape(got) != np.shape(want):
                return f"{name}.{key} has shape {None if got is None else np.shape(got)}, expected {np.shape(want)}"
            if not np.all(np.isfinite(got)):
                return f"{name}.{key} is not finite (NaN or Inf)"
    for key, value in (head_end or {}).items():
        if head_start is not None and key in head_start and np.shape(value) != np.shape(head_start[key]):
            return f"head {key} has shape {np.shape(value)}, expected {np.shape(head_start[key])}"
        if not np.all(np.isfinite(value)):
            return f"head {key} is not finite (NaN or Inf)"
    if max_norm is not None:
        norm = update_norm(start, end, train)
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds federation.max_update_norm {max_norm:g}"
    return None


def clip_update(start: Factors, end: Factors, train: frozenset[str], max_norm: float) -> Factors:
    """`end` with its change scaled by min(1, max_norm / ‖end − start‖) (trained factors only)."""
    norm = update_norm(start, end, train)
    if norm <= max_norm:
        return end
    c = max_norm / norm
    out = {}
    for name, s in start.items():
        moved = {key: (getattr(s, key) + c * (np.asarray(getattr(end[name], key)) - getattr(s, key))).astype(
                 np.asarray(getattr(end[name], key)).dtype)
                 for key in train if getattr(s, key) is not None}
        out[name] = replace(end[name], **moved)
    return out
