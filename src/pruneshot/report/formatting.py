"""Display text of the report's values: fractions as percent, budgets, p-values, the missing-value
mark, and booleans as read back from CSV."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

#: What a missing value reads in every table.
MISSING = "—"


def finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_budget(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return MISSING if math.isnan(v) else f"{v:.3g}"


def fmt_num(value: Any, spec: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return MISSING if value is None or value == "" else str(value)
    return MISSING if math.isnan(v) else format(v, spec)


def fmt_acc(mean: float, ci: float) -> str:
    """Format fractions as percent text: 0.834, 0.012 -> "83.4 ± 1.2"."""
    ci_txt = MISSING if ci is None or not math.isfinite(ci) else f"{100 * ci:.1f}"
    return f"{100 * mean:.1f} ± {ci_txt}"


def fmt_p(p: Any) -> str:
    v = finite(p)
    if v is None:
        return MISSING
    return "<0.0001" if v < 1e-4 else f"{v:.4f}" if v < 0.01 else f"{v:.3f}"

def shots_key(value: Any) -> int | None:
    v = finite(value)
    return int(v) if v is not None else None


def truthy(values: pd.Series | None) -> pd.Series:
    """A boolean column as read back from CSV (True/False, "True"/"False"; missing: False)."""
    if values is None:
        return pd.Series(dtype=bool)
    return values.map(lambda v: v is True or str(v).strip().lower() == "true")
