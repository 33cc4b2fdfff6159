"""What `gradyard calibrate` and `gradyard analyze` run; the CLI only parses arguments.

Both print a few lines of text, or one JSON object with ``--json``, and return
an exit status.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional, TextIO

from gradyard.analysis.calibrate import DeviceProfile, calibrate
from gradyard.analysis.record import StepRecord
from gradyard.analysis.report import format_profile, format_verdict, write_report
from gradyard.analysis.verdict import analyze_run


def run_calibrate(json_out: bool = False, quick: bool = False, save: bool = True,
                  out: TextIO = sys.stdout) -> int:
    """Calibrate this process's device, cache the profile, print it."""
    profile = calibrate(quick=quick)
    path = profile.save() if save else None
    if json_out:
        out.write(json.dumps(profile.to_dict()) + "\n")
    else:
        out.write(format_profile(profile) + "\n")
        if path:
            out.write(f"saved: {path}\n")
    return 0


def run_analyze(step_record: dict[str, Any], out_dir: Optional[os.PathLike] = None, json_out: bool = False,
                profile: Optional[DeviceProfile] = None, out: TextIO = sys.stdout, probe: bool = False) -> int:
    """Verdict for a step record (the parsed ``analysis/step.json``), plus the report in ``out_dir``.

    The calibration is ``profile``, else the one stored in the record, else this
    machine's cached profile for the record's device.  ``probe``: first time the
    job's step here at its batch and twice it (:func:`~gradyard.analysis.probe.batch_scaling`),
    and take the overhead share from that.
    """
    record = StepRecord.from_dict(step_record)
    profile = profile or record.profile
    if profile is None:
        out.write("no calibration in the step record and none given: run `gradyard calibrate` on that device\n")
        return 2
    if probe:
        if not record.job:
            out.write("the step record carries no job (written before gradyard recorded it): "
                      "run the job again, then `gradyard analyze --probe`\n")
            return 2
        import torch

        from gradyard.analysis.probe import batch_scaling, job_workload

        device = record.census.device_type or "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            out.write("the step record was taken on a GPU and this machine has none: the probe times the job's "
                      "step on the record's device, so run `gradyard analyze --probe` on a GPU machine\n")
            return 2
        batch = record.batch_size or int(record.job["data"]["batch_size"])
        step_record = dict(step_record, batch_scaling_ratio=batch_scaling(
            lambda b: job_workload(record.job, b, device), batch))
    verdict = analyze_run(step_record, profile)
    paths = write_report(verdict, record.census, record.phases, profile, out_dir) if out_dir else []
    if json_out:
        d = verdict.to_dict()
        d["report"] = [str(p) for p in paths]
        out.write(json.dumps(d) + "\n")
    else:
        out.write(format_verdict(verdict) + "\n")
        for p in paths:
            out.write(f"wrote: {p}\n")
    return 0
