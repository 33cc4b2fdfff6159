"""Figures from repeated rounds: a summary of absolute values, and ratios that decide a target.

A ratio is taken per round (the contender over the baseline run beside it in the
same round) and summarised by its geometric mean with a 95% interval: Student's
t on the mean of the log ratios.  Not a bootstrap: with the 3-8 rounds a bench
can afford, a percentile bootstrap's "95%" interval holds the true ratio only
about 75-90% of the time (it cannot be wider than the rounds' own spread), so it
would call targets met or missed too often; t keeps its coverage at any round
count for roughly normal log ratios.  A target is **met** when the whole interval
is on its good side, **missed** when the whole interval is on the bad side, and
otherwise **not resolved** at this noise, with the rounds that would shrink the
interval on the target's side to the distance between the estimate and the
target (the same spread assumed).
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


def _half_width(sd: float, n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)


def ratio(values: Sequence[Optional[float]], target: Optional[float] = None, better: str = "higher") -> dict:
    """Geometric mean of per-round ratios, its 95% interval and, with a target, the verdict."""
    xs = [float(v) for v in values if v is not None and v > 0]
    out: dict = {"n": len(xs), "values": [round(v, 6) for v in xs]}
    if not xs:
        return out
    logs = [math.log(x) for x in xs]
    mean = statistics.fmean(logs)
    out["estimate"] = math.exp(mean)
    if len(xs) >= MIN_ROUNDS:
        half = _half_width(statistics.stdev(logs), len(xs))
        out["ci"] = [math.exp(mean - half), math.exp(mean + half)]
    if target is not None:
        out.update(target=target, better=better, **verdict(out, logs, target, better))
    return out


def verdict(r: dict, logs: list[float], target: float, better: str) -> dict:
    """met / missed / not resolved, and for the last the rounds that would likely resolve it."""
    if "ci" not in r:
        return {"verdict": "not resolved", "rounds_to_resolve": None}  # no interval yet: MIN_ROUNDS first
    low, high = r["ci"]
    met, missed = (low > target, high < target) if better == "higher" else (high < target, low > target)
    if met or missed:
        return {"verdict": "met" if met else "missed"}
    distance, sd = abs(math.log(r["estimate"]) - math.log(target)), statistics.stdev(logs)
    for n in range(r["n"] + 1, 1001):
        if _half_width(sd, n) < distance:
            return {"verdict": "not resolved", "rounds_to_resolve": n}
    return {"verdict": "not resolved", "rounds_to_resolve": None}  # more than 1000: the estimate is on the target
