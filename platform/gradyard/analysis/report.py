"""The verdict for people: a few terminal lines, two pictures and a markdown page.

``write_report`` puts ``roofline.png``, ``step_breakdown.png`` and
``report.md`` (which shows both) in a local directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from gradyard.analysis.calibrate import DeviceProfile
from gradyard.analysis.census import Census
from gradyard.analysis.opclass import CLASSES, COMMUNICATION
from gradyard.analysis.published import published_peak
from gradyard.analysis.record import Phases
from gradyard.analysis.verdict import REGIMES, Verdict

_PREFIXES = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")]

REGIME_COLOURS = {"input": "#8e6c8a", "communication": "#d1495b", "overhead": "#edae49",
                  "compute": "#00798c", "memory": "#30638e"}
# Phases share a colour with the regime they feed (data wait -> input, exposed comm -> communication).
PHASE_COLOURS = {"data": "#8e6c8a", "forward": "#66a182", "backward": "#2e4057",
                 "optimizer": "#9bc1bc", "exposed comm": "#d1495b", "other": "#bbbbbb"}
CLASS_COLOURS = dict(zip(CLASSES, ["#00798c", "#30638e", "#66a182", "#edae49", "#8e6c8a", "#d1495b", "#999999"]))


def si(x: Optional[float], unit: str = "", digits: int = 3) -> str:
    """1.5e12, "FLOP/s" -> "1.5 TFLOP/s"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    for scale, prefix in _PREFIXES:
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}"


def secs(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


# ---------------------------------------------------------------------------
# Terminal


def format_profile(p: DeviceProfile) -> str:
    peaks = " · ".join(f"{dt} {si(v, 'FLOP/s')}" for dt, v in p.peak_flops.items())
    detail = ", ".join(f"{k} {si(v, 'B/s')}" for k, v in p.mem_bandwidth_detail.items())
    lines = [
        f"device: {p.device}  [{p.device_type}, torch {p.torch_version}, measured {p.measured_at}"
        f"{', quick' if p.quick else ''}]",
        f"matmul peak: {peaks}",
        f"memory bandwidth: {si(p.mem_bandwidth_bytes_per_s, 'B/s')} ({detail}) · ridge point "
        f"{p.ridge_point:.3g} FLOP/B (float32 {p.ridge('float32'):.3g})",
        f"dispatch overhead: {secs(p.dispatch_overhead_s)}/op · allreduce busbw: "
        + (f"{si(p.allreduce_busbw_bytes_per_s, 'B/s')} across {p.allreduce_world_size}"
           if p.allreduce_busbw_bytes_per_s else "n/a (no process group)"),
    ]
    pub = published_peak(p.device) if p.device_type == "cuda" else None
    if pub:
        ratios = " · ".join(f"{dt} {p.peak_flops[dt] / v:.0%}" for dt, v in pub.peak_flops.items() if dt in p.peak_flops)
        if pub.mem_bandwidth_bytes_per_s:
            ratios += f" · bandwidth {p.mem_bandwidth_bytes_per_s / pub.mem_bandwidth_bytes_per_s:.0%}"
        lines.append(f"measured / datasheet ({pub.name}): {ratios} (comparison only)")
    return "\n".join(lines)


def _margin(n: dict) -> str:
    spread = n.get("margin_spread")
    return (f"margin {n['verdict_margin']:.0%} over {n['runner_up']}"
            + (f", spread {spread:.0%} across the timed steps" if spread is not None else ""))


def share_evidence(v: Verdict) -> list[tuple[str, float, str]]:
    """Each regime's share with the measurement behind it: (regime, share, evidence)."""
    n = v.numbers
    roof = n.get("roofline_explained_share")
    comm = (f"{secs(n['comm_exposed_s'])} exposed allreduce of {si(n['comm_bytes_per_step'], 'B')}"
            + (f"; bus bandwidth explains {n['comm_bandwidth_explained']:.0%} of it ({n['comm_bound_by']}-bound)"
               if n.get("comm_bandwidth_explained") is not None else
               (f" ({n['comm_bound_by']})" if n.get("comm_bound_by") else ""))
            + (f"; one-float allreduce {secs(n['allreduce_latency_s'])}" if n.get("allreduce_latency_s") else ""))
    roof_text = (f"roofline {secs(n['roofline_s'])} explains {roof:.0%} of compute time" if roof is not None
                 else "no compute time")
    evidence = {
        "input": f"data wait {n['data_wait_share']:.0%} of the step",
        "communication": comm,
        "overhead": f"{secs(n['overhead_s'])} from {n['overhead_source']}; {n['ops_per_step']} ops at "
                    f"{secs(n['time_per_op_s'])} each, {n['tiny_ops_share']:.0%} of them too small to reach the roof",
        "compute": f"{roof_text}; MFU {n['mfu']:.1%}",
        "memory": f"{roof_text}; {si(n['bytes_per_step'], 'B')} at {n['bandwidth_share']:.0%} of "
                  f"{si(n['bandwidth_bytes_per_s'], 'B/s')}",
    }
    return [(r, v.shares[r], evidence[r]) for r in sorted(REGIMES, key=lambda r: -v.shares[r])]


def format_verdict(v: Verdict) -> str:
    n = v.numbers
    split = " · ".join(f"{r} {v.shares[r]:.0%}" for r in sorted(REGIMES, key=lambda r: -v.shares[r]))
    lines = [
        f"regime: {n['verdict']}  ({split} of a {secs(n['step_s'])} step; {_margin(n)})",
        f"roofline: {n['arithmetic_intensity']:.3g} FLOP/B vs ridge {n['ridge_point']:.3g} FLOP/B "
        f"({n['roofline_side']} side) · MFU {n['mfu']:.1%} · bandwidth {n['bandwidth_share']:.0%} of "
        f"{si(n['bandwidth_bytes_per_s'], 'B/s')}",
        f"idle {n['device_idle_share']:.0%} ({n['device_idle_source']}) · {n['ops_per_step']} ops/step at "
        f"{secs(n['time_per_op_s'])} each (dispatch {secs(n['dispatch_overhead_s'])}) · data wait "
        f"{n['data_wait_share']:.0%} · exposed comm {n['communication_share']:.0%}",
    ]
    if v.remedies:
        r = v.remedies[0]
        lines.append(f"try: {r.action} — {r.expected}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Pictures


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def _si_formatter(unit: str):
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos: si(x, unit, 3).strip())


def plot_roofline(verdict: Verdict, census: Census, profile: DeviceProfile, path: os.PathLike) -> Path:
    plt = _plt()
    n = verdict.numbers
    dtype = n["dtype"]
    bw = profile.mem_bandwidth_bytes_per_s
    peak = n["peak_flops_per_s"]
    ridge = peak / bw

    classes = census.by_class()
    use_device = census.device_type == "cuda"
    total_t = sum((s.device_s if use_device else s.cpu_s) for s in classes.values()) or 1.0
    points, no_flops = [], []
    for name, s in classes.items():
        t = s.device_s if use_device else s.cpu_s
        if name == COMMUNICATION or s.count == 0:
            continue
        if s.flops <= 0 or s.bytes <= 0 or t <= 0:
            if s.bytes > 0:
                no_flops.append(f"{name} ({si(s.bytes, 'B')})")
            continue
        points.append((name, s.intensity, s.flops / t, t / total_t))

    xs = [p[1] for p in points] + [ridge] + ([n["arithmetic_intensity"]] if n["arithmetic_intensity"] else [])
    xlo, xhi = min(xs) / 8, max(xs) * 8
    step_y = n["achieved_flops_per_s"]
    ys = [p[2] for p in points] + [peak] + ([step_y] if step_y else [])
    # Down to the lowest point: how far a point sits below the roof is the story (overhead-bound steps).
    ylo, yhi = min(min(ys) / 4, bw * xlo / 2), max(profile.peak_flops.values()) * 3
    grid = [xlo * (xhi / xlo) ** (i / 200) for i in range(201)]

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    ax.axvspan(xlo, ridge, color="#30638e", alpha=0.05, zorder=0)
    ax.axvspan(ridge, xhi, color="#00798c", alpha=0.05, zorder=0)

    for dt, pk in sorted(profile.peak_flops.items(), key=lambda kv: kv[1]):
        if dt != dtype:
            ax.plot(grid, [min(pk, bw * x) for x in grid], color="#999999", lw=1, ls="--", zorder=1,
                    label=f"{dt} roof: {si(pk, 'FLOP/s')}")
    pub = published_peak(profile.device) if profile.device_type == "cuda" else None
    if pub and dtype in pub.peak_flops and pub.mem_bandwidth_bytes_per_s:
        ppk, pbw = pub.peak_flops[dtype], pub.mem_bandwidth_bytes_per_s
        ax.plot(grid, [min(ppk, pbw * x) for x in grid], color="#bb8800", lw=1, ls=(0, (1, 2)), zorder=1,
                label=f"{pub.name} datasheet {dtype} (comparison only)")
    ax.plot(grid, [min(peak, bw * x) for x in grid], color="#222222", lw=2.5, zorder=2)
    ax.annotate(f"{dtype} compute ceiling {si(peak, 'FLOP/s')}", (xhi, peak), xytext=(-4, 5),
                textcoords="offset points", ha="right", fontsize=9, weight="bold")
    ax.axvline(ridge, color="#222222", ls=":", lw=1, zorder=1)
    ax.annotate(f"ridge point {ridge:.3g} FLOP/B", (ridge, peak), xytext=(-14, 40), textcoords="offset points",
                ha="right", fontsize=8.5, arrowprops={"arrowstyle": "->", "color": "#444444"})

    for name, x, y, share in points:
        ax.scatter([x], [y], s=60 + 600 * share, color=CLASS_COLOURS[name], edgecolor="white", lw=1, zorder=4,
                   alpha=0.9)
        pad = 4 + math.sqrt(60 + 600 * share) / 2  # clear of the marker, whose area grows with its share
        ax.annotate(f"{name}\n{share:.0%} of op time", (x, y), xytext=(pad, -10), textcoords="offset points",
                    fontsize=8.5, color=CLASS_COLOURS[name])
    if n["arithmetic_intensity"] and step_y:
        ax.scatter([n["arithmetic_intensity"]], [step_y], marker="*", s=380, color="#d1495b", edgecolor="black",
                   lw=0.8, zorder=5,
                   label=f"whole step: {si(step_y, 'FLOP/s')} at {n['arithmetic_intensity']:.3g} FLOP/B")

    ax.xaxis.set_major_formatter(_si_formatter(""))
    ax.yaxis.set_major_formatter(_si_formatter("FLOP/s"))
    ax.set_xlabel("Arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("Achieved performance (FLOP/s)")
    ax.set_title(f"Roofline — {profile.device}\nverdict: {verdict.regime}-bound "
                 f"(MFU {n['mfu']:.1%}, bandwidth {n['bandwidth_share']:.0%} of the calibrated roof)", fontsize=11)
    ax.text(0.02, 0.97, "memory-bound side", transform=ax.transAxes, va="top", fontsize=9, color="#30638e")
    ax.text(0.98, 0.97, "compute-bound side", transform=ax.transAxes, ha="right", va="top", fontsize=9,
            color="#00798c")
    if no_flops:
        ax.text(0.02, 0.02, "no FLOPs, not plotted: " + ", ".join(no_flops), transform=ax.transAxes, fontsize=7.5,
                color="#555555")
    ax.grid(True, which="major", alpha=0.25)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 0.05), fontsize=8.5, frameon=True, framealpha=0.9)
    fig.tight_layout()
    # Bandwidth label along the slope: its angle on screen depends on the final axes size.
    x1 = math.sqrt(xlo * min(ridge, xhi)) / 2
    x1 = min(max(x1, xlo * 2, ylo / bw * 2), ridge / 2)
    p1, p2 = ax.transData.transform([(x1, bw * x1), (x1 * 2, bw * x1 * 2)])
    angle = math.degrees(math.atan2(p2[1] - p1[1], p2[0] - p1[0]))
    ax.annotate(f"memory bandwidth {si(bw, 'B/s')}", (x1, bw * x1), xytext=(0, 5), textcoords="offset points",
                fontsize=9, weight="bold", rotation=angle, rotation_mode="anchor")
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _stacked_bar(ax, y: float, parts: list[tuple[str, float, str]], total: float) -> None:
    left = 0.0
    for label, value, colour in parts:
        if value <= 0:
            continue
        ax.barh([y], [value], left=left, color=colour, edgecolor="white", height=0.6)
        share = value / total if total else 0.0
        if share >= 0.09:
            ax.text(left + value / 2, y, f"{label}\n{secs(value)} ({share:.0%})", ha="center", va="center",
                    fontsize=8.5, color="white", weight="bold")
        left += value


def plot_step_breakdown(verdict: Verdict, phases: Phases, path: os.PathLike) -> Path:
    plt = _plt()
    step = phases.step_s or sum((phases.data_s, phases.forward_s, phases.backward_s, phases.optimizer_s,
                                 phases.comm_exposed_s))
    phase_parts = [("data", phases.data_s), ("forward", phases.forward_s), ("backward", phases.backward_s),
                   ("optimizer", phases.optimizer_s), ("exposed comm", phases.comm_exposed_s),
                   ("other", phases.other_s)]
    regime_parts = [(r, verdict.shares[r] * step) for r in ("input", "communication", "overhead", "memory", "compute")]

    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=120)
    _stacked_bar(ax, 1, [(k, v, PHASE_COLOURS[k]) for k, v in phase_parts], step)
    _stacked_bar(ax, 0, [(k, v, REGIME_COLOURS[k]) for k, v in regime_parts], step)
    ax.set_yticks([1, 0], ["phases", "what bounds it"])
    ax.set_xlim(0, step * 1.001 if step else 1)
    ax.set_xlabel("seconds per step")
    ax.set_title(f"Where one {secs(step)} step goes — {verdict.regime}-bound", fontsize=11)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    # The legend names every part of at least 0.5%, including those too thin to label in the bar.
    shown_phases = [(k, v) for k, v in phase_parts if step and v / step >= 0.005]
    shown_regimes = [(k, v) for k, v in regime_parts if step and v / step >= 0.005]
    legend = [f"{k}: {secs(v)} ({v / step:.0%})" for k, v in shown_phases]
    handles = [plt.Rectangle((0, 0), 1, 1, color=PHASE_COLOURS[k]) for k, _ in shown_phases]
    legend += [f"{k}-bound: {v / step:.0%}" for k, v in shown_regimes]
    handles += [plt.Rectangle((0, 0), 1, 1, color=REGIME_COLOURS[k]) for k, _ in shown_regimes]
    ax.legend(handles, legend, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------
# Markdown


def _markdown(verdict: Verdict, census: Census, phases: Phases, profile: DeviceProfile) -> str:
    n = verdict.numbers
    out = [f"# Step analysis: {n['verdict']}", "",
           f"**Device** {profile.device} · **dtype** {n['dtype']} · **step** {secs(n['step_s'])}", "",
           "```", format_verdict(verdict), "```", "",
           "![Roofline: each operator class against the calibrated roof](roofline.png)", "",
           "![Step time by phase and by what bounds it](step_breakdown.png)", "",
           "## Shares and their evidence", "",
           f"**{n['verdict']}**: {_margin(n)} (mixed when the margin is inside that spread).", "",
           "| regime | share | evidence |", "|---|---:|---|"]
    out += [f"| {r} | {share:.0%} | {text} |" for r, share, text in share_evidence(verdict)]
    out += ["", "## Evidence", "", "| measure | value |", "|---|---|"]
    rows = [
        ("arithmetic intensity (step)", f"{n['arithmetic_intensity']:.3g} FLOP/B"),
        ("ridge point (calibrated)", f"{n['ridge_point']:.3g} FLOP/B → {n['roofline_side']} side"),
        ("MFU (model FLOPs / step / calibrated peak)", f"{n['mfu']:.1%}"),
        ("achieved FLOP/s while computing", si(n["achieved_flops_per_s"], "FLOP/s")),
        ("achieved bandwidth / calibrated", f"{si(n['achieved_bandwidth_bytes_per_s'], 'B/s')} "
                                            f"({n['bandwidth_share']:.0%})"),
        (f"device idle share ({n['device_idle_source']})", f"{n['device_idle_share']:.0%}"),
        ("ops per step · time per op · dispatch cost", f"{n['ops_per_step']} · {secs(n['time_per_op_s'])} · "
                                                       f"{secs(n['dispatch_overhead_s'])}"),
        ("exposed communication share", f"{n['communication_share']:.0%} ({phases.comm_source})"),
        ("data wait share", f"{n['data_wait_share']:.0%}"),
        ("batch scaling time(2B)/time(B)", "not probed" if n["batch_scaling_ratio"] is None
         else f"{n['batch_scaling_ratio']:.2f}"),
    ]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "Share of the step by regime: " + ", ".join(f"{r} {verdict.shares[r]:.0%}" for r in REGIMES), ""]

    out += ["## Remedies", ""]
    out += [f"{i}. **{r.action}** ({r.regime}) — {r.expected}" for i, r in enumerate(verdict.remedies, 1)]
    out += ["", "## Operator classes", "", "| class | ops | FLOPs | bytes | FLOP/B | time share |",
            "|---|---:|---:|---:|---:|---:|"]
    classes = census.by_class()
    use_device = census.device_type == "cuda"
    total_t = sum((s.device_s if use_device else s.cpu_s) for s in classes.values()) or 1.0
    for name, s in classes.items():
        if s.count == 0 and not (s.cpu_s or s.device_s):
            continue
        t = s.device_s if use_device else s.cpu_s
        out.append(f"| {name} | {s.count} | {si(s.flops)} | {si(s.bytes, 'B')} | {s.intensity:.3g} | {t / total_t:.0%} |")
    top = sorted(census.op_totals().values(), key=lambda o: -census.op_seconds(o.op))[:10]
    out += ["", "## Top operators by time", "", "| op | class | calls | FLOP/B | time |", "|---|---|---:|---:|---:|"]
    out += [f"| `{o.op}` | {o.op_class} | {o.count} | {o.intensity:.3g} | {secs(census.op_seconds(o.op))} |"
            for o in top]
    out += ["", "## Calibration", "", "```", format_profile(profile), "```", ""]
    if verdict.notes:
        out += ["## Notes", ""] + [f"- {x}" for x in verdict.notes] + [""]
    return "\n".join(out)


def write_report(verdict: Verdict, census: Census, phases: Phases, profile: DeviceProfile,
                 out_dir: os.PathLike) -> list[Path]:
    """Write roofline.png, step_breakdown.png and report.md into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_roofline(verdict, census, profile, out / "roofline.png"),
             plot_step_breakdown(verdict, phases, out / "step_breakdown.png")]
    md = out / "report.md"
    md.write_text(_markdown(verdict, census, phases, profile))
    paths.append(md)
    return paths
