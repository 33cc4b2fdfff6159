"""Which wall a training step is up against, and the numbers that say so.

The step's wall time is split five ways (Horace He's three regimes plus the
two distributed training adds), and the largest part is the verdict:

- **input**: waiting for data (``data_s``).
- **communication**: allreduce time the backward did not hide (``comm_exposed_s``).
- **overhead**: compute time the device spends neither computing nor moving
  memory: Python, autograd, dispatch, kernel launch.  Found, in order of
  preference: from the batch-scaling probe (overhead does not grow with the
  batch: time = O + c*B, so its share is 2 - time(2B)/time(B)); on CUDA from
  the profiler's device idle share; on CPU from the profiled step, as the share
  of its wall time spent outside *sized* ops, those whose roofline time per
  call (max(flops/peak, bytes/bw)) is at least ``TINY_OP_FACTOR`` x the
  calibrated dispatch cost; without profiler times, from what the step itself
  measured: an op whose roofline time per call is below the step's measured
  time per op cannot reach the roof, and the time the roofline leaves
  unexplained, spread evenly over the ops, is overhead on those ops (all of it
  when the roofline explains under ``ROOF_EVIDENCE_SHARE`` of compute time).
  The calibrated bare dispatch cost misses autograd, hooks and the optimizer's
  bookkeeping, so it is only ever a floor.
- **compute** / **memory**: the rest of compute time, divided by measured op
  time on each side of the ridge point (an op whose FLOPs/byte is at or above
  peak FLOP/s / bandwidth is compute-bound).

Communication is *bandwidth*-bound when the calibrated bus bandwidth explains at
least ``BANDWIDTH_EXPLAINED_SHARE`` of the exposed allreduce time for the step's
bytes and, where the group's one-float allreduce time (the collective's fixed
cost, Hockney's alpha) was measured, the transfer takes at least
``LATENCY_FACTOR`` times it; else *latency*-bound (a small gradient: the
collective's fixed cost and the wait for the other ranks), with remedies that cut
syncs rather than bytes.  Below twice the size at which a collective reaches half
the bus bandwidth (n_1/2 = alpha x bandwidth) the fixed cost is still a third of
the collective's time or more, and halving the bytes buys little.

The verdict is the largest share of the timed steps' medians, with its margin
over the runner-up; the same shares are taken on each timed step alone, and when
the margin is inside the spread those per-step margins showed, the verdict is
``mixed (a / b)``: the measurement cannot tell the two apart.

Remedies follow the verdict (and any other part over ``SECONDARY_SHARE``),
each with what the evidence says it could buy.

Longer than 350 lines because the rules, their thresholds and the remedies each rule proposes
are read together when a verdict is questioned.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from gradyard.analysis.calibrate import DeviceProfile
from gradyard.analysis.opclass import COMMUNICATION, DATA_MOVEMENT, ELEMENTWISE, OTHER, REDUCTION
from gradyard.analysis.record import StepRecord
from gradyard.steptime import StepBreakdown

REGIMES = ("compute", "memory", "overhead", "communication", "input")

TINY_OP_FACTOR = 10.0
"""An op whose roofline time per call is below this many dispatch costs is tiny: its fixed cost dominates."""
ROOF_EVIDENCE_SHARE = 0.1
"""Without profiler times, compute- or memory-bound needs the roofline (bytes and FLOPs against the
calibrated roof) to explain at least this share of compute time; below it, no op reaches the roof
and the unexplained time is overhead."""
BANDWIDTH_EXPLAINED_SHARE = 0.5
"""Exposed allreduce time is bandwidth-bound when the calibrated bus bandwidth explains at least this
share of it for the step's bytes; otherwise latency-bound (synchronisation, round trips)."""
LATENCY_FACTOR = 2.0
"""Bandwidth-bound also needs the transfer at the bus bandwidth to take this many one-float allreduce
times (the payload past twice n_1/2); a gradient of a few hundred kB over gloo is not."""
SECONDARY_SHARE = 0.2
"""Parts of the step at least this large get their remedies listed too."""


@dataclass
class Evidence(StepBreakdown):
    """The measured inputs of a verdict: the step's breakdown (:class:`~gradyard.analysis.record.Phases`'
    fields, defined once in :class:`gradyard.steptime.StepBreakdown`), then FLOPs, bytes and the roof."""

    flops: float = 0.0
    """All counted FLOPs (pointwise at 1/element)."""
    model_flops: float = 0.0
    """FLOPs of flop_counter formulas (matmul/conv/attention): the MFU numerator."""
    bytes: float = 0.0
    n_ops: int = 0
    roofline_s: float = 0.0
    """Sum over ops of max(flops/peak, bytes/bandwidth): the step's time if every op ran on the roof."""
    compute_side_s: float = 0.0
    """Measured time of ops at or above the ridge point."""
    memory_side_s: float = 0.0
    """Measured time of ops below the ridge point."""
    peak_flops_per_s: float = 1.0
    bandwidth_bytes_per_s: float = 1.0
    dispatch_overhead_s: float = 0.0
    dtype: str = "float32"
    device: str = ""
    device_type: str = "cpu"
    device_idle_share: Optional[float] = None
    """CUDA: share of compute time no kernel ran (profiler); None on CPU."""
    sized_ops_share: Optional[float] = None
    """CPU: share of the profiled step's wall time spent inside sized (non-tiny) ops; None without profiler."""
    tiny_ops_share: float = 0.0
    """Share of the step's ops (by count) too small to reach the roof: roofline time per call below
    the step's own measured time per op (compute time / op count)."""
    batch_scaling_ratio: Optional[float] = None
    comm_bytes: float = 0.0
    """Payload handed to collectives per step."""
    allreduce_busbw_bytes_per_s: Optional[float] = None
    allreduce_latency_s: Optional[float] = None
    """Seconds of a one-float allreduce across the group (the fixed cost of a collective)."""
    world_size: int = 1
    has_conv: bool = False
    movement_bytes_share: float = 0.0
    """Share of bytes moved by data-movement ops (copies, layout changes)."""
    fusable_bytes_share: float = 0.0
    """Share of bytes moved by elementwise and reduction ops (what fusion removes)."""

    @property
    def ridge_point(self) -> float:
        return self.peak_flops_per_s / self.bandwidth_bytes_per_s

    @property
    def compute_s(self) -> float:
        """Time on the device's work: the step less data wait and exposed communication."""
        return max(self.step_s - self.data_s - self.comm_exposed_s, 1e-12)


NUMBER_UNITS: dict[str, Optional[str]] = {
    "step_s": "seconds", "compute_s": "seconds", "roofline_s": "seconds", "time_per_op_s": "seconds",
    "dispatch_overhead_s": "seconds", "allreduce_ideal_s": "seconds", "overhead_s": "seconds",
    "comm_exposed_s": "seconds", "allreduce_latency_s": "seconds",
    "top_share": "ratio", "runner_up_share": "ratio", "verdict_margin": "ratio", "margin_spread": "ratio",
    "roofline_explained_share": "ratio", "tiny_ops_share": "ratio", "comm_bandwidth_explained": "ratio",
    "verdict": None, "runner_up": None, "comm_bound_by": None,
    "bytes_per_step": "bytes", "comm_bytes_per_step": "bytes",
    "achieved_bandwidth_bytes_per_s": "bytes_per_second", "bandwidth_bytes_per_s": "bytes_per_second",
    "flops_per_step": "flops", "model_flops_per_step": "flops",
    "achieved_flops_per_s": "flops_per_second", "peak_flops_per_s": "flops_per_second",
    "arithmetic_intensity": "flops_per_byte", "ridge_point": "flops_per_byte",
    "ops_per_step": "ops",
    "mfu": "ratio", "roofline_position": "ratio", "bandwidth_share": "ratio", "device_idle_share": "ratio",
    "dispatch_share": "ratio", "sized_ops_share": "ratio", "communication_share": "ratio",
    "data_wait_share": "ratio", "batch_scaling_ratio": "ratio",
    "device": None, "dtype": None, "roofline_side": None, "device_idle_source": None, "overhead_source": None,
}
"""The unit of every evidence number of :func:`classify` (None: text, left to verdict.json and the logs).

Telemetry exports each unit as a metric of its own
(``gradyard_regime_evidence_<unit>{key}``, :mod:`gradyard.telemetry.metrics`):
one name never mixes seconds with bytes per second.
"""


@dataclass
class Remedy:
    regime: str
    action: str
    expected: str
    """What the evidence says it could buy."""


@dataclass
class Verdict:
    regime: str
    shares: dict[str, float]
    """Share of step time per regime; sums to 1."""
    numbers: dict[str, Any]
    """Evidence numbers (JSON-ready): roofline position, MFU, bandwidth share, idle share..."""
    remedies: list[Remedy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"regime": self.regime, **self.numbers, "shares": self.shares,
                "remedies": [asdict(r) for r in self.remedies], "notes": self.notes}

    def evidence_by_unit(self) -> dict[str, dict[str, float]]:
        """The finite evidence numbers grouped by unit (:data:`NUMBER_UNITS`): {unit: {key: value}}.

        Numbers that were not measured (None) are left out; a number without a
        unit in the table is an error, not a guess.
        """
        out: dict[str, dict[str, float]] = {}
        for key, value in self.numbers.items():
            unit = NUMBER_UNITS[key]
            if unit is None or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"evidence {key!r} is {value!r}, expected a number of {unit}")
            if math.isfinite(value):
                out.setdefault(unit, {})[key] = float(value)
        return out

    def to_json(self, indent: Optional[int] = None) -> str:
        """One JSON object: ``regime`` and the evidence numbers beside it."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verdict":
        numbers = {k: v for k, v in d.items() if k not in ("regime", "shares", "remedies", "notes")}
        return cls(regime=d["regime"], shares=d["shares"], numbers=numbers,
                   remedies=[Remedy(**r) for r in d.get("remedies", [])], notes=d.get("notes", []))


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, x))


def _compute_s(ev: Evidence) -> float:
    """The step's compute time; none when data wait and exposed communication fill the step."""
    return ev.compute_s if ev.step_s > ev.data_s + ev.comm_exposed_s else 0.0


def _overhead(ev: Evidence, compute_s: float) -> tuple[float, str]:
    """Share of compute time that is overhead, and where the figure came from."""
    unexplained = _clamp(1 - ev.roofline_s / compute_s) if compute_s else 0.0
    dispatch_share = _clamp(ev.n_ops * ev.dispatch_overhead_s / compute_s) if compute_s else 0.0
    if ev.batch_scaling_ratio is not None:
        return _clamp(2 - ev.batch_scaling_ratio), "batch scaling (2 - time(2B)/time(B))"
    if ev.device_idle_share is not None:
        return ev.device_idle_share, "device idle share (profiler)"
    if ev.sized_ops_share is not None:
        return _clamp(1 - ev.sized_ops_share), "time outside sized ops (profiler)"
    if not compute_s or ev.roofline_s / compute_s < ROOF_EVIDENCE_SHARE:
        return unexplained, "roofline residual: no op reaches the roof"
    # The time the roofline leaves unexplained, spread evenly over the step's ops (each op pays
    # the same fixed cost): the tiny ops' part is overhead, the sized ops' part is time those ops
    # ran below the roof.  The calibrated bare dispatch cost is a floor, never the estimate.
    measured = unexplained * ev.tiny_ops_share
    return max(measured, min(unexplained, dispatch_share)), "roofline residual on tiny ops (measured per-op time)"


def _shares(ev: Evidence) -> tuple[dict[str, float], float, str]:
    """Share of the step per regime (sums to 1), the overhead share of compute time and its source."""
    step = max(ev.step_s, 1e-12)
    compute_s = _compute_s(ev)
    overhead_frac, source = _overhead(ev, compute_s)
    rest = compute_s * (1 - overhead_frac)
    sides = ev.compute_side_s + ev.memory_side_s
    intensity = ev.flops / ev.bytes if ev.bytes else 0.0
    compute_frac = ev.compute_side_s / sides if sides else (1.0 if intensity >= ev.ridge_point else 0.0)
    shares = {
        "input": ev.data_s / step,
        "communication": ev.comm_exposed_s / step,
        "overhead": compute_s * overhead_frac / step,
        "compute": rest * compute_frac / step,
        "memory": rest * (1 - compute_frac) / step,
    }
    total = sum(shares.values()) or 1.0
    return {k: v / total for k, v in shares.items()}, overhead_frac, source


def _ranked(shares: dict[str, float]) -> list[str]:
    return sorted(REGIMES, key=lambda r: -shares[r])  # ties: REGIMES order


def _comm_bound_by(ev: Evidence, ideal_s: Optional[float]) -> tuple[Optional[str], Optional[float]]:
    """``latency`` or ``bandwidth`` (what the exposed allreduce time is made of), and the share of it
    the calibrated bus bandwidth explains for the step's bytes."""
    if ev.world_size < 2 or ev.comm_exposed_s <= 0:
        return None, None
    if ideal_s is None:
        return "not calibrated", None
    explained = _clamp(ideal_s / ev.comm_exposed_s)
    past_fixed_cost = ev.allreduce_latency_s is None or ideal_s >= LATENCY_FACTOR * ev.allreduce_latency_s
    return ("bandwidth" if explained >= BANDWIDTH_EXPLAINED_SHARE and past_fixed_cost else "latency"), explained


def regime_label(regime: str, comm_bound_by: Optional[str] = None) -> str:
    if regime == "communication" and comm_bound_by in ("latency", "bandwidth"):
        return f"communication-bound ({comm_bound_by})"
    return f"{regime}-bound"


def classify(ev: Evidence, samples: Sequence[Evidence] = ()) -> Verdict:
    """The verdict of ``ev`` (the timed steps' medians); ``samples``, the same step's evidence with
    each timed step's own breakdown, measure the spread of its margin."""
    step = max(ev.step_s, 1e-12)
    compute_s = _compute_s(ev)
    unexplained = _clamp(1 - ev.roofline_s / compute_s) if compute_s else 0.0
    dispatch_share = _clamp(ev.n_ops * ev.dispatch_overhead_s / compute_s) if compute_s else 0.0
    notes: list[str] = []
    shares, overhead_frac, source = _shares(ev)
    regime, runner_up = _ranked(shares)[:2]
    margin = shares[regime] - shares[runner_up]
    sample_margins = []
    for sample in samples:
        sh = _shares(sample)[0]
        sample_margins.append(sh[regime] - sh[runner_up])
    spread = (max(sample_margins) - min(sample_margins)) if len(sample_margins) >= 2 else None
    mixed = spread is not None and margin <= spread

    achieved = ev.flops / compute_s if compute_s else 0.0
    achieved_bw = ev.bytes / compute_s if compute_s else 0.0
    ideal_comm = None
    if ev.allreduce_busbw_bytes_per_s and ev.comm_bytes and ev.world_size > 1:
        n = ev.world_size
        ideal_comm = ev.comm_bytes * 2 * (n - 1) / n / ev.allreduce_busbw_bytes_per_s
    bound_by, explained = _comm_bound_by(ev, ideal_comm)
    intensity = ev.flops / ev.bytes if ev.bytes else 0.0
    ridge = ev.ridge_point
    pair = sorted((regime, runner_up), key=REGIMES.index)  # one name for the pair, whichever leads
    label = (f"mixed ({pair[0]} / {pair[1]})" if mixed
             else regime_label(regime, bound_by if regime == "communication" else None))
    numbers: dict[str, Any] = {
        "verdict": label,
        "runner_up": runner_up,
        "top_share": shares[regime],
        "runner_up_share": shares[runner_up],
        "verdict_margin": margin,
        "margin_spread": spread,
        "device": ev.device,
        "dtype": ev.dtype,
        "step_s": ev.step_s,
        "compute_s": compute_s,
        "overhead_s": compute_s * overhead_frac,
        "arithmetic_intensity": intensity,
        "ridge_point": ridge,
        "roofline_position": intensity / ridge if ridge else None,
        "roofline_side": "compute" if intensity >= ridge else "memory",
        "flops_per_step": ev.flops,
        "model_flops_per_step": ev.model_flops,
        "bytes_per_step": ev.bytes,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": ev.peak_flops_per_s,
        "mfu": ev.model_flops / step / ev.peak_flops_per_s,
        "achieved_bandwidth_bytes_per_s": achieved_bw,
        "bandwidth_bytes_per_s": ev.bandwidth_bytes_per_s,
        "bandwidth_share": achieved_bw / ev.bandwidth_bytes_per_s,
        "roofline_s": ev.roofline_s,
        "roofline_explained_share": _clamp(ev.roofline_s / compute_s) if compute_s else None,
        "device_idle_share": ev.device_idle_share if ev.device_idle_share is not None else unexplained,
        "device_idle_source": "profiler" if ev.device_idle_share is not None else "roofline residual",
        "overhead_source": source,
        "ops_per_step": ev.n_ops,
        "time_per_op_s": compute_s / ev.n_ops if ev.n_ops else None,
        "tiny_ops_share": ev.tiny_ops_share,
        "dispatch_overhead_s": ev.dispatch_overhead_s,
        "dispatch_share": dispatch_share,
        "sized_ops_share": ev.sized_ops_share,
        "communication_share": ev.comm_exposed_s / step,
        "comm_exposed_s": ev.comm_exposed_s,
        "comm_bytes_per_step": ev.comm_bytes,
        "allreduce_ideal_s": ideal_comm,
        "allreduce_latency_s": ev.allreduce_latency_s,
        "comm_bound_by": bound_by,
        "comm_bandwidth_explained": explained,
        "data_wait_share": ev.data_s / step,
        "batch_scaling_ratio": ev.batch_scaling_ratio,
    }
    if ev.batch_scaling_ratio is None:
        notes.append("no batch-scaling probe: overhead share estimated from " + source)
    if mixed:
        notes.append(f"{regime} ({shares[regime]:.0%}) and {runner_up} ({shares[runner_up]:.0%}) differ by "
                     f"{margin:.0%}, inside the {spread:.0%} their margin varied across the {len(samples)} "
                     "timed steps: both bound the step")
    if regime in ("compute", "memory") and unexplained > 0.5:
        notes.append(f"the roofline explains only {1 - unexplained:.0%} of compute time: beyond the overhead "
                     "share, ops run well below the roof (layouts, dtypes, kernel choice); see the top operators")
    if compute_s and ev.roofline_s > 1.5 * compute_s:
        notes.append("the step ran faster than the calibrated roof allows: the profile may be stale "
                     "or from another thread count / clock")
    return Verdict(regime=regime, shares=shares, numbers=numbers, remedies=remedies(regime, shares, ev, numbers),
                   notes=notes)


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _speedup(share: float) -> str:
    """Throughput gain from removing ``share`` of the step."""
    gain = 1 / max(1 - share, 1e-9)
    return f"{gain:.2f}x" if gain < 10 else "10x or more"


def remedies(regime: str, shares: dict[str, float], ev: Evidence, numbers: dict[str, Any]) -> list[Remedy]:
    """Remedies for the verdict first, then for any other part of the step over SECONDARY_SHARE."""
    order = [regime] + [r for r in sorted(shares, key=shares.get, reverse=True)
                        if r != regime and shares[r] >= SECONDARY_SHARE]
    out: list[Remedy] = []
    for r in order:
        s = shares[r]
        if r == "input":
            out += [
                Remedy(r, "More DataLoader workers (num_workers, prefetch_factor) so the next batch is ready",
                       f"data wait is {_pct(s)} of the step: hiding it cuts step time by up to {_pct(s)} "
                       f"({_speedup(s)} throughput)"),
                Remedy(r, "pin_memory=True and .to(device, non_blocking=True)",
                       "overlaps the host-to-device copy with compute (part of the same wait)"),
                Remedy(r, "Pre-decode or cache the dataset (tensor shards on local disk)",
                       "removes decoding from the loop when workers alone cannot keep up"),
            ]
        elif r == "communication" and numbers.get("comm_bound_by") == "latency":
            lat = numbers.get("allreduce_latency_s")
            hint = (f"; a one-float allreduce takes {lat * 1e6:.0f} us here" if lat else "")
            explained = numbers.get("comm_bandwidth_explained") or 0.0
            out += [
                Remedy(r, "Gradient accumulation: k micro-batches under model.no_sync(), allreduce once",
                       f"exposed allreduce is {_pct(s)} of the step and the bus bandwidth explains only "
                       f"{_pct(explained)} of it (latency{hint}): one sync per k steps saves up to "
                       f"{_pct(s * 3 / 4)} per sample at k=4"),
                Remedy(r, "Larger batch per step (the allreduce's fixed cost is paid once a step)",
                       f"doubling the batch halves the sync cost per sample: up to {_pct(s / 2)}"),
                Remedy(r, "Fewer, larger DDP buckets (DistributedDataParallel(bucket_cap_mb=...)); each "
                          "bucket's allreduce pays the latency",
                       f"{ev.comm_bytes / 1e3:.0f} kB of gradient a step: one bucket holds it all"),
            ]
        elif r == "communication":
            hint = ""
            if numbers.get("allreduce_ideal_s"):
                ratio = ev.comm_exposed_s / numbers["allreduce_ideal_s"]
                hint = f"; exposed allreduce is {ratio:.1f}x the calibrated time for {ev.comm_bytes / 1e6:.0f} MB"
            out += [
                Remedy(r, "Larger DDP buckets (DistributedDataParallel(bucket_cap_mb=...), default 25)",
                       f"exposed allreduce is {_pct(s)} of the step; full overlap with backward saves up to {_pct(s)}"
                       + hint),
                Remedy(r, "Gradient accumulation: k micro-batches under model.no_sync(), allreduce once",
                       f"allreduce per sample falls k-fold: k=4 saves up to {_pct(s * 3 / 4)} per sample"),
                Remedy(r, "bf16 gradient compression: model.register_comm_hook(None, bf16_compress_hook)",
                       f"halves allreduce bytes: up to {_pct(s / 2)} shorter steps"),
            ]
        elif r == "overhead":
            per_op = numbers.get("time_per_op_s") or 0.0
            out += [
                Remedy(r, "Larger batch per step (fixed per-step cost is amortised)",
                       f"overhead is {_pct(s)} of the step and does not grow with the batch: doubling it "
                       f"cuts time per sample by up to {_pct(s / 2)}"),
                Remedy(r, "torch.compile the model (fuses ops: fewer dispatches and launches)",
                       f"{ev.n_ops} ops per step at {per_op * 1e6:.1f} us each; removing the overhead saves up to "
                       f"{_pct(s)}"),
            ]
            if ev.device_type == "cuda":
                out.append(Remedy(r, "CUDA graphs (torch.compile(mode='reduce-overhead'))",
                                  f"replays the step's kernels with one launch: up to {_pct(s)}"))
        elif r == "memory":
            if ev.dtype in ("float32", "tf32"):
                out.append(Remedy(r, "bf16 autocast (torch.autocast(device_type, dtype=torch.bfloat16))",
                                  f"memory-bound ops are {_pct(s)} of the step; half the bytes saves up to "
                                  f"{_pct(s / 2)}"))
            out.append(Remedy(r, "Fuse elementwise chains with torch.compile",
                              f"elementwise and reduction ops move {_pct(ev.fusable_bytes_share)} of the bytes; "
                              f"a fused chain reads and writes once (up to {_pct(s * ev.fusable_bytes_share)})"))
            if ev.has_conv:
                out.append(Remedy(r, "channels_last for the conv net (model.to(memory_format=torch.channels_last))",
                                  f"data-movement ops move {_pct(ev.movement_bytes_share)} of the bytes; "
                                  "channels_last avoids layout copies around convs"))
        elif r == "compute":
            mfu = numbers.get("mfu") or 0.0
            fast = None
            if ev.dtype in ("float32",):
                fast = "tf32 or bfloat16" if ev.device_type == "cuda" else "bfloat16"
            if fast:
                out.append(Remedy(r, f"Tensor-core dtypes: {fast} (torch.autocast / "
                                     "torch.set_float32_matmul_precision('high'))",
                                  f"matmul-bound time is {_pct(s)} of the step at MFU {_pct(mfu)} of the float32 "
                                  "peak; see the calibrated peaks per dtype for the ceiling"))
            out.append(Remedy(r, "Already near the roof: scale out, or cut FLOPs (smaller model, less recompute)",
                              f"MFU {_pct(mfu)} of the calibrated {ev.dtype} peak"))
    return out


def _ridge_side(census_op: Any, profile: DeviceProfile, dtype_default: str, tf32: bool) -> str:
    dt = census_op.dtype or dtype_default
    if dt == "float32" and tf32:
        dt = "tf32"
    return "compute" if census_op.intensity >= profile.ridge(dt) else "memory"


def evidence_from(record: StepRecord, profile: DeviceProfile) -> Evidence:
    census, ph = record.census, record.phases
    tf32 = census.device_type == "cuda" and census.allow_tf32
    dtype = census.dtype
    bw = profile.mem_bandwidth_bytes_per_s

    def op_peak(dt: str) -> float:
        return profile.peak("tf32" if (dt == "float32" and tf32) else (dt or dtype))

    def roof_s(o: Any) -> float:
        return max(o.flops / op_peak(o.dtype), o.bytes / bw)

    n_ops = sum(o.count for o in census.ops if o.op_class != COMMUNICATION)
    per_op_s = max(ph.step_s - ph.data_s - ph.comm_exposed_s, 0.0) / n_ops if n_ops else 0.0
    roofline_s = 0.0
    tiny_count = 0
    fallback = {"compute": 0.0, "memory": 0.0}
    for o in census.ops:
        if o.op_class == COMMUNICATION:
            continue
        t_flops, t_bytes = o.flops / op_peak(o.dtype), o.bytes / bw
        roofline_s += max(t_flops, t_bytes)
        fallback["compute" if t_flops >= t_bytes else "memory"] += max(t_flops, t_bytes)
        if o.count and max(t_flops, t_bytes) / o.count < per_op_s:
            tiny_count += o.count  # would finish faster than the step's ops took each: its fixed cost rules

    # Measured op time on each side of the ridge, from sized ops (a tiny op's time is overhead).
    sides = {"compute": 0.0, "memory": 0.0}
    all_sides = {"compute": 0.0, "memory": 0.0}
    tiny_s = TINY_OP_FACTOR * profile.dispatch_overhead_s
    totals = census.op_totals()
    for name in census.times:
        op = totals.get(name)
        if op is None or op.op_class in (COMMUNICATION, OTHER) or not op.count:
            continue  # composite wrappers, autograd nodes: their self time is overhead, not roofline work
        side = _ridge_side(op, profile, dtype, tf32)
        seconds = census.op_seconds(name)
        all_sides[side] += seconds
        # On CUDA an op's device time is kernel time whatever its size; on CPU a tiny op's time is fixed cost.
        if census.device_type != "cpu" or roof_s(op) / op.count >= tiny_s:
            sides[side] += seconds
    sized_share = None
    if census.device_type == "cpu" and census.times and census.profiled_wall_s:
        sized_share = _clamp(sum(sides.values()) / census.profiled_wall_s)
    if not any(sides.values()):
        sides = all_sides if any(all_sides.values()) else fallback

    by_class = census.by_class()
    total_bytes = census.bytes or 1.0
    idle = None
    if census.device_type == "cuda" and census.device_busy_s is not None and census.profiled_wall_s:
        idle = _clamp(1 - census.device_busy_s / census.profiled_wall_s)
    # The job's own group measured in the run wins over a calibration, which may come from another group.
    allreduce = dict(record.allreduce or {})
    if not allreduce and profile.allreduce_world_size in (None, record.world_size):
        allreduce = {"busbw_bytes_per_s": profile.allreduce_busbw_bytes_per_s,
                     "latency_s": profile.allreduce_latency_s}
    return Evidence(
        **ph.breakdown(),
        flops=census.flops, model_flops=census.model_flops, bytes=census.bytes,
        n_ops=n_ops,
        roofline_s=roofline_s, compute_side_s=sides["compute"], memory_side_s=sides["memory"],
        peak_flops_per_s=op_peak(dtype), bandwidth_bytes_per_s=bw,
        dispatch_overhead_s=profile.dispatch_overhead_s, dtype=dtype, device=profile.device,
        device_type=census.device_type, device_idle_share=idle, sized_ops_share=sized_share,
        tiny_ops_share=tiny_count / n_ops if n_ops else 0.0,
        batch_scaling_ratio=record.batch_scaling_ratio,
        comm_bytes=census.comm_bytes,
        allreduce_busbw_bytes_per_s=allreduce.get("busbw_bytes_per_s"),
        allreduce_latency_s=allreduce.get("latency_s"),
        world_size=record.world_size,
        has_conv=any("conv" in o.op for o in census.ops),
        movement_bytes_share=by_class[DATA_MOVEMENT].bytes / total_bytes,
        fusable_bytes_share=(by_class[ELEMENTWISE].bytes + by_class[REDUCTION].bytes) / total_bytes,
    )


def sample_evidence(ev: Evidence, record: StepRecord) -> list[Evidence]:
    """``ev`` once per timed step, with that step's own breakdown (the census's counts are the step's
    whatever its timing): the verdict's spread."""
    return [dataclasses.replace(ev, **s.breakdown()) for s in record.phases.samples]


def analyze_run(step_record: dict[str, Any], profile: Optional[DeviceProfile] = None) -> Verdict:
    """Verdict for a step record (the dict of ``analysis/step.json``), over each of its timed steps.

    ``profile`` defaults to the calibration stored in the record.
    """
    record = StepRecord.from_dict(step_record)
    profile = profile or record.profile
    if profile is None:
        raise ValueError("step record carries no calibration: pass a DeviceProfile (gradyard calibrate)")
    ev = evidence_from(record, profile)
    return classify(ev, sample_evidence(ev, record))
