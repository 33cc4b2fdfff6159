"""Figures from repeated rounds: a summary of absolute values, and ratios that decide a target.

A ratio is taken per round (the contender over the baseline run beside it in the
same round) and summarised by its geometric mean with a 95% bootstrap interval
over the rounds (scipy's, percentile method: with five rounds BCa's
acceleration estimate is itself noise).  A target is **met** when the whole
interval is on the good side of it, **missed** when the whole interval is on the
bad side, and otherwise **not resolved** at this noise, with the rounds that
would shrink the interval (which narrows as 1/sqrt(rounds)) to the distance
between the estimate and the target.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

CONFIDENCE = 0.95
MIN_ROUNDS = 3
"""Fewer rounds give no interval: the ratio is shown, the target not resolved."""


def summary(values: Sequence[Optional[float]]) -> dict:
    """n, median, min, max of the values that exist (and the values)."""
    xs = [float(v) for v in values if v is not None]
    out: dict = {"n": len(xs), "values": [round(v, 6) for v in xs]}
    if xs:
        out.update(median=statistics.median(xs), min=min(xs), max=max(xs))
    return out


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> list[Optional[float]]:
    """a[i] / b[i] for each round i: a contender against the one run beside it."""
    return [x / y if x is not None and y else None for x, y in zip(a, b)]


def ratio(values: Sequence[Optional[float]], target: Optional[float] = None, better: str = "higher") -> dict:
    """Geometric mean of per-round ratios, its bootstrap interval and, with a target, the verdict."""
    xs = [float(v) for v in values if v is not None and v > 0]
    out: dict = {"n": len(xs), "values": [round(v, 6) for v in xs]}
    if not xs:
        return out
    logs = [math.log(x) for x in xs]
    out["estimate"] = math.exp(statistics.fmean(logs))
    if len(xs) >= MIN_ROUNDS and max(logs) > min(logs):
        from scipy.stats import bootstrap

        ci = bootstrap((logs,), statistics.fmean, confidence_level=CONFIDENCE, method="percentile",
                       n_resamples=4999, random_state=0, vectorized=False).confidence_interval
        out["ci"] = [math.exp(ci.low), math.exp(ci.high)]
    elif len(xs) >= MIN_ROUNDS:
        out["ci"] = [xs[0], xs[0]]
    if target is not None:
        out.update(target=target, better=better, **verdict(out, target, better))
    return out


def verdict(r: dict, target: float, better: str) -> dict:
    """met / missed / not resolved, and for the last the rounds that would likely resolve it."""
    if "ci" not in r:
        return {"verdict": "not resolved", "rounds_to_resolve": MIN_ROUNDS}
    low, high = r["ci"]
    met, missed = (low > target, high < target) if better == "higher" else (high < target, low > target)
    if met or missed:
        return {"verdict": "met" if met else "missed"}
    half = (math.log(high) - math.log(low)) / 2
    distance = abs(math.log(r["estimate"]) - math.log(target))
    need = r["n"] * (half / distance) ** 2 if distance > 0 else math.inf
    return {"verdict": "not resolved",
            "rounds_to_resolve": None if not math.isfinite(need) or need > 1000 else max(r["n"] + 1, math.ceil(need))}
