"""The analysis inside a running job: census of a real step, verdict, live regime metric.

Rank 0 writes ``<run>/analysis/step.json`` (what ``gradyard analyze`` reads)
and ``<run>/analysis/verdict.json``, prints the verdict, and sets
the ``gradyard_regime`` state and its ``gradyard_regime_evidence_<unit>`` when
telemetry is on.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

# Kineto (the profiler's backend) logs CUDA probing errors even on CPU-only
# hosts; read when the profiler first starts, so this must come before.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from gradyard.analysis.callback import CensusCallback
from gradyard.storage import Storage

log = logging.getLogger("gradyard.analysis")


def live_analysis(storage: Storage, rank: int, *, at_step: int = 5, metrics: Any = None,
                  timer: Any = None, batch_size: Optional[int] = None,
                  profile_ops: bool = False) -> CensusCallback:
    def sink(record) -> None:
        if rank != 0:
            return
        from gradyard.analysis.calibrate import load_or_calibrate
        from gradyard.analysis.verdict import analyze_run

        # On CPU/gloo the profiler cannot see exposed allreduce time; the
        # telemetry's completion-timed comm hook can.
        last = getattr(timer, "last_phases", None) or {}
        if record.phases.comm_source == "not measured" and "comm_exposed" in last:
            exposed = float(last["comm_exposed"])
            record.phases.comm_exposed_s = exposed
            record.phases.backward_s = max(0.0, record.phases.backward_s - exposed)
            record.phases.comm_source = "telemetry comm hook"
        if record.profile is None:
            # Cached per device after the first time: a quick calibration (~0.5 s on CPU).
            record.profile = load_or_calibrate(quick=True)
        verdict = analyze_run(record.to_dict(), record.profile)
        for name, payload in (("step.json", record.to_dict()), ("verdict.json", verdict.to_dict())):
            storage.write_json(storage.join("analysis", name), payload)
        if metrics is not None:
            metrics.set_regime(verdict.regime, verdict.evidence_by_unit())
        shown = [f"{k} {v:.3g}" for k, v in verdict.numbers.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)][:5]
        print(f"[analysis] step {record.step}: {verdict.regime}-bound ({', '.join(shown)})", flush=True)

    return CensusCallback(at_step=at_step, sink=sink, batch_size=batch_size, profile_ops=profile_ops)
