"""Formatting of table cells: values, floats, mean ± std, seconds, byte counts (missing values print as '-').

Human-facing numbers are rounded: metrics to 3 decimals, times to 0.1 s, byte counts to 3 significant digits
in one unit per table column (`byte_unit`), so a column never mixes KB and MB."""

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


def fmt_float(v: Any, sci: bool = False, digits: int = 3) -> str:
    v = _scalar(v)
    if is_missing(v):
        return "-"
    return f"{float(v):.2e}" if sci else f"{float(v):.{digits}f}"


def mean_and_std(vals: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation) of a non-empty list; the deviation is None for one value."""
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def fmt_mean_std(values, sci: bool) -> str:
    """Mean ± sample standard deviation of the non-missing values (just the mean for one value)."""
    vals = [float(v) for v in values if not is_missing(_scalar(v))]
    if not vals:
        return "-"
    mean, std = mean_and_std(vals)
    return fmt_float(mean, sci) if std is None else f"{fmt_float(mean, sci)} ± {fmt_float(std, sci)}"


def fmt_seconds(v: Any) -> str:
    """Seconds to 0.1 s: 151.7 s."""
    return "-" if is_missing(_scalar(v)) else f"{float(_scalar(v)):.1f} s"


BYTE_UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0))


def byte_unit(values) -> str:
    """The decimal unit for a column of byte counts: GB, MB, KB or B, by its largest value."""
    vals = [abs(float(_scalar(v))) for v in values if not is_missing(_scalar(v))]
    largest = max(vals, default=0.0)
    return next(unit for unit, size in BYTE_UNITS if largest >= size or unit == "B")


def fmt_bytes(n: Any, unit: str | None = None) -> str:
    """A byte count in `unit` (default: its own `byte_unit`) to 3 significant digits: 1.51 MB, 0.776 MB, 151 MB."""
    n = _scalar(n)
    if is_missing(n):
        return "-"
    unit = unit or byte_unit([n])
    x = float(n) / dict(BYTE_UNITS)[unit]
    if unit == "B":
        return f"{x:.0f} B"
    decimals = 0 if x == 0 else min(3, max(0, 2 - math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f} {unit}"


def sorted_unique(series) -> list:
    """The distinct non-null values of a pandas Series as Python scalars, sorted (by text if mixed)."""
    vals = [_scalar(v) for v in series.dropna().unique()]
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def slug(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)
