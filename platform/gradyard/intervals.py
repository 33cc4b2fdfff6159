"""Busy time of overlapping spans: one helper for telemetry (a step's allreduce buckets) and analysis
(a profiled step's kernels).  A module of its own, below both packages: a leaf either can import."""

from __future__ import annotations


def union_seconds(intervals: list[tuple[float, float]], lo: float = float("-inf"),
                  hi: float = float("inf")) -> float:
    """Length of the union of ``intervals`` clipped to [lo, hi] (busy time of overlapping spans: the
    allreduce buckets of a step, the kernels of a profiled step)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted((max(s, lo), min(e, hi)) for s, e in intervals):
        if end <= start:
            continue
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total
