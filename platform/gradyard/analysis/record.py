"""The step record: what the trainer writes to ``<run>/analysis/step.json``.

One JSON object (``schema: "gradyard.analysis.step/1"``)::

    {
      "schema": "gradyard.analysis.step/1",
      "step": 5,                      # training step the census counted
      "world_size": 2, "batch_size": 64,
      "created_at": "2026-01-01T00:00:00+00:00",
      "phases": {                     # median seconds per step, see Phases
        "data_s": ..., "forward_s": ..., "backward_s": ..., "optimizer_s": ...,
        "comm_exposed_s": ..., "step_s": ..., "steps_timed": 3, "comm_source": "profiler",
        "samples": [{"data_s": ..., ...}, ...]   # each timed step's breakdown (the verdict's spread)
      },
      "census": { ... Census.to_dict() ... },   # ops, profiler times, totals, by_class
      "profile": { ... DeviceProfile.to_dict() ... } | null,   # calibration used
      "batch_scaling_ratio": 1.9 | null,        # time(2B) / time(B), when probed
      "allreduce": {"busbw_bytes_per_s": ..., "latency_s": ..., "world_size": 2} | null,
                                                # measured across the job's own group
      "job": { ... the job document, URLs redacted ... } | null   # what `gradyard analyze --probe` rebuilds
    }

Readers ignore keys they do not know, so fields may be added without a new schema version.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from gradyard.analysis.calibrate import DeviceProfile
from gradyard.analysis.census import Census
from gradyard.steptime import StepBreakdown

SCHEMA = "gradyard.analysis.step/1"


@dataclass
class Phases(StepBreakdown):
    """Where one training step's wall time goes: medians over the timed steps (seconds).

    The fields are the step timer's (:class:`gradyard.steptime.StepBreakdown`, the one definition
    of the phases); the census takes them from the timer's records of its timing steps.
    """

    steps_timed: int = 0
    comm_source: str = "not measured"
    """How comm_exposed_s was found: `telemetry comm hook` (the step timer's gradient-sync marks),
    `profiler` (NCCL kernels not overlapped), `no_sync` (backward with and without DDP's
    allreduce), `not measured` (then it is 0)."""
    samples: list[StepBreakdown] = field(default_factory=list)
    """Each timed step's own breakdown, the medians' inputs: the verdict is judged on each too, and
    the spread of its margin across them says whether the top two shares are told apart."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Phases":
        names = {f.name for f in dataclasses.fields(cls)} - {"samples"}
        parts = {f.name for f in dataclasses.fields(StepBreakdown)}
        samples = [StepBreakdown(**{k: v for k, v in s.items() if k in parts}) for s in d.get("samples", [])]
        return cls(**{k: v for k, v in d.items() if k in names}, samples=samples)


@dataclass
class StepRecord:
    census: Census
    phases: Phases
    profile: Optional[DeviceProfile] = None
    step: Optional[int] = None
    world_size: int = 1
    batch_size: Optional[int] = None
    batch_scaling_ratio: Optional[float] = None
    allreduce: Optional[dict[str, Any]] = None
    """The job's own group's allreduce, measured by the live census: ``busbw_bytes_per_s``,
    ``latency_s``, ``world_size`` (used where the calibration has none)."""
    job: Optional[dict[str, Any]] = None
    """The job document (every URL redacted): ``gradyard analyze --probe`` rebuilds its step from it."""
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "step": self.step,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "created_at": self.created_at,
            "phases": self.phases.to_dict(),
            "census": self.census.to_dict(),
            "profile": self.profile.to_dict() if self.profile is not None else None,
            "batch_scaling_ratio": self.batch_scaling_ratio,
            "allreduce": self.allreduce,
            "job": self.job,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepRecord":
        schema = d.get("schema", SCHEMA)
        if not str(schema).startswith("gradyard.analysis.step/"):
            raise ValueError(f"not a gradyard step record (schema {schema!r})")
        return cls(
            census=Census.from_dict(d["census"]),
            phases=Phases.from_dict(d["phases"]),
            profile=DeviceProfile.from_dict(d["profile"]) if d.get("profile") else None,
            step=d.get("step"),
            world_size=d.get("world_size", 1),
            batch_size=d.get("batch_size"),
            batch_scaling_ratio=d.get("batch_scaling_ratio"),
            allreduce=d.get("allreduce"),
            job=d.get("job"),
            created_at=d.get("created_at", ""),
        )
