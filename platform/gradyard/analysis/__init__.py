"""Compute-, memory-, overhead-, communication- or input-bound? Measure, count, decide, show.

- :func:`calibrate` measures the device's roof (:class:`DeviceProfile`).
- :func:`census_of` / :class:`CensusCallback` count FLOPs and bytes per aten op
  of a real step and time it with the profiler (:class:`Census`).
- :func:`probe` times a :class:`Workload` by phase and takes its census
  (:class:`StepRecord`, the schema of ``analysis/step.json``).
- :func:`classify` / :func:`analyze_run` give the :class:`Verdict` with its evidence and remedies.
- :func:`write_report` draws ``roofline.png`` and ``step_breakdown.png`` into ``report.md``.
"""

from gradyard.analysis.calibrate import DeviceProfile, calibrate, device_name, load_or_calibrate
from gradyard.analysis.census import Census, CensusCallback, CensusMode, census_of
from gradyard.analysis.commands import run_analyze, run_calibrate
from gradyard.analysis.probe import Workload, batch_scaling, probe, time_phases
from gradyard.analysis.published import MEM_BANDWIDTH, published_peak
from gradyard.analysis.record import SCHEMA, Phases, StepRecord
from gradyard.analysis.report import format_profile, format_verdict, write_report
from gradyard.analysis.verdict import REGIMES, Evidence, Verdict, analyze_run, classify, evidence_from

__all__ = [
    "Census", "CensusCallback", "CensusMode", "DeviceProfile", "Evidence", "MEM_BANDWIDTH", "Phases", "REGIMES",
    "SCHEMA", "StepRecord", "Verdict", "Workload", "analyze_run", "batch_scaling", "calibrate", "census_of",
    "classify", "device_name", "evidence_from", "format_profile", "format_verdict", "load_or_calibrate", "probe",
    "published_peak", "run_analyze", "run_calibrate", "time_phases", "write_report",
]
