"""Median and spread of repeated measurements, and paired ratios of interleaved contenders."""

from __future__ import annotations

import statistics
from typing import Optional, Sequence


def summary(values: Sequence[Optional[float]]) -> dict:
    """n, median, min, max, q1, q3 (quartiles only from 4 values on) of the values that exist."""
    xs = sorted(float(v) for v in values if v is not None)
    out: dict = {"n": len(xs), "values": [round(v, 6) for v in values if v is not None]}
    if not xs:
        return out
    out.update(median=statistics.median(xs), min=xs[0], max=xs[-1])
    if len(xs) >= 4:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        out.update(q1=q1, q3=q3)
    return out


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> list[Optional[float]]:
    """a[i] / b[i] for each round i: a contender against the one run beside it."""
    return [x / y if x is not None and y else None for x, y in zip(a, b)]


def fmt(s: dict, digits: int = 3, unit: str = "") -> str:
    """`median (min–max)` with the IQR when there are enough values."""
    if not s.get("n"):
        return "n/a"
    g = f"{{:.{digits}g}}"
    text = f"{g.format(s['median'])}{unit} ({g.format(s['min'])}–{g.format(s['max'])})"
    if "q1" in s:
        text += f", IQR {g.format(s['q1'])}–{g.format(s['q3'])}"
    return text
