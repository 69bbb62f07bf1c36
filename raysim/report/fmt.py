"""Formatting of table cells: values, floats, mean ± std, byte counts (missing values print as '-')."""

from __future__ import annotations

import math
from typing import Any


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_value(v: Any) -> str:
    v = _scalar(v)
    if is_missing(v):
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_float(v: Any, sci: bool = False, digits: int = 4) -> str:
    v = _scalar(v)
    if is_missing(v):
        return "-"
    return f"{float(v):.2e}" if sci else f"{float(v):.{digits}f}"


def fmt_mean_std(values, sci: bool) -> str:
    """Mean ± sample standard deviation of the non-missing values (just the mean for one value)."""
    vals = [float(v) for v in values if not is_missing(_scalar(v))]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return fmt_float(mean, sci)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{fmt_float(mean, sci)} ± {fmt_float(std, sci)}"


def fmt_bytes(n: Any) -> str:
    """Decimal units: 999 B, 1.5 KB, 2.0 MB, … GB."""
    n = _scalar(n)
    if is_missing(n):
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def sorted_unique(series) -> list:
    """The distinct non-null values of a pandas Series as Python scalars, sorted (by text if mixed)."""
    vals = [_scalar(v) for v in series.dropna().unique()]
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def slug(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)
