"""The analysis inside a running job: census of a real step, verdict, live regime metric.

Rank 0 writes ``<run>/analysis/step.json`` (what ``gradyard analyze`` reads)
and ``<run>/analysis/verdict.json``, prints the verdict, and hands it to a
:class:`RegimeSink` when there is one: telemetry's metrics, which export the
``gradyard_regime`` state and its ``gradyard_regime_evidence_<unit>``.

The seam with telemetry is typed both ways: step times come from the trainer's
step timer as :class:`gradyard.steptime.StepTimes` records (the census reads
them), and the verdict leaves through :class:`RegimeSink`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Protocol

# Kineto (the profiler's backend) logs CUDA probing errors even on CPU-only
# hosts; read when the profiler first starts, so this must come before.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from gradyard.analysis.callback import CensusCallback
from gradyard.analysis.record import StepRecord
from gradyard.steptime import CENSUS_AT_STEP
from gradyard.storage import Storage

log = logging.getLogger("gradyard.analysis")


class RegimeSink(Protocol):
    """Where a live verdict goes (:class:`gradyard.telemetry.metrics.TelemetryMetrics` is one)."""

    def set_regime(self, regime: str, evidence: Optional[Mapping[str, Mapping[str, float]]] = None) -> None:
        """``regime`` is one of :data:`~gradyard.analysis.verdict.REGIMES`; ``evidence`` is
        :meth:`Verdict.evidence_by_unit() <gradyard.analysis.verdict.Verdict.evidence_by_unit>`."""


def live_analysis(storage: Storage, rank: int, *, at_step: int = CENSUS_AT_STEP,
                  regime: Optional[RegimeSink] = None, batch_size: Optional[int] = None,
                  profile_ops: bool = False, job: Optional[dict[str, Any]] = None) -> CensusCallback:
    """The live census (every rank: its steps and its allreduce measurement are collective in
    effect); rank 0 judges.  ``job`` (redacted) travels in the record for ``gradyard analyze --probe``."""
    def sink(record: StepRecord) -> None:
        if rank != 0:
            return
        record.job = job
        from gradyard.analysis.calibrate import load_or_calibrate
        from gradyard.analysis.verdict import analyze_run

        if record.profile is None:
            # Cached per device after the first time: a quick calibration (~0.5 s on CPU).
            record.profile = load_or_calibrate(quick=True)
        verdict = analyze_run(record.to_dict(), record.profile)
        for name, payload in (("step.json", record.to_dict()), ("verdict.json", verdict.to_dict())):
            storage.write_json(storage.join("analysis", name), payload)
        if regime is not None:
            regime.set_regime(verdict.regime, verdict.evidence_by_unit())
        n = verdict.numbers
        print(f"[analysis] step {record.step}: {n['verdict']} ({verdict.regime} {n['top_share']:.0%}, "
              f"{n['runner_up']} {n['runner_up_share']:.0%}, margin {n['verdict_margin']:.0%}"
              + (f" against a spread of {n['margin_spread']:.0%} across the timed steps"
                 if n["margin_spread"] is not None else "") + ")", flush=True)

    return CensusCallback(at_step=at_step, sink=sink, batch_size=batch_size, profile_ops=profile_ops,
                          measure_allreduce=True)
