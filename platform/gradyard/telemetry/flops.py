"""FLOPs per step, dense peak FLOP/s per device, and MFU.

FLOPs are counted by gradyard's one FLOP counter, the census's counting mode
(:class:`gradyard.analysis.census.CensusMode`: ``torch.utils.flop_counter``'s
formulas, each op run unchanged), from BEFORE_FORWARD to AFTER_BACKWARD on
*measured* steps only: the first step of the process and every
``telemetry.measure_flops_every`` steps.  The count is the census's
``model_flops`` (matmul, conv, attention: the number MFU is defined on).  The
counter intercepts every op in Python, which slows that step down, so a
measured step is *disturbed* for the step timer (:mod:`gradyard.steptime`)
and left out of every step-time average.  The count is shape-based, so one
measurement holds for every step of the same batch shape.

MFU = (step FLOPs / mean time of recent undisturbed steps) / peak FLOP/s.  The peak is a published
dense number (no structured sparsity) for the device and the precision the
matmuls run at, or a calibrated profile when one is given.  When neither
knows the device (CPU, an unlisted GPU), MFU is absent, never a guess.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional, Union

import torch

from gradyard.analysis.census import Census, CensusMode
from gradyard.events import Callback, Event
from gradyard.steptime import StepTimes
from gradyard.telemetry.metrics import TelemetryMetrics, identity_labels

log = logging.getLogger(__name__)

# Dense peak FLOP/s by torch.cuda.get_device_name() and matmul precision.
# Sources: the vendor datasheets; where a datasheet quotes "with sparsity"
# the dense figure is half of it.
#   H100 SXM5 / H200:  NVIDIA H100 Tensor Core GPU datasheet (2023) and H200 datasheet
#                      (BF16/FP16 1,979 TF sparse, TF32 989 TF sparse, FP32 67 TF)
#   H100 PCIe:         same H100 datasheet, PCIe column (1,513 / 756 TF sparse, FP32 51 TF)
#   A100 (all forms):  NVIDIA A100 Tensor Core GPU datasheet (BF16/FP16 312, TF32 156, FP32 19.5 TF)
#   L40S:              NVIDIA L40S datasheet (BF16/FP16 362.05, TF32 183, FP32 91.6 TF)
#   L4:                NVIDIA L4 datasheet (FP16/BF16 242 TF sparse, TF32 120 TF sparse, FP32 30.3 TF)
#   A10:               NVIDIA A10 datasheet (BF16/FP16 125, TF32 62.5, FP32 31.2 TF).  NVIDIA
#                      publishes no A10G (AWS G5) sheet; A10's figures are used for it, which
#                      may overstate its peak - give a calibrated profile where that matters.
#   T4:                NVIDIA T4 datasheet (mixed FP16 65 TF, FP32 8.1 TF; no BF16, no TF32)
#   V100:              NVIDIA V100 datasheet (SXM2: tensor 125 TF, FP32 15.7 TF;
#                      PCIe: tensor 112 TF, FP32 14 TF; no BF16, no TF32)
# A GPU without TF32 runs fp32 matmuls at its FP32 rate (see peak_flops); one
# without BF16 tensor cores has no bf16 entry, so its bf16 MFU is absent.
_H100_SXM = {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}
_A100 = {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}
_A10 = {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}
_V100_SXM = {"fp16": 125e12, "fp32": 15.7e12}
_V100_PCIE = {"fp16": 112e12, "fp32": 14e12}

PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "NVIDIA H200": _H100_SXM,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    "NVIDIA L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "NVIDIA A10": _A10,
    "NVIDIA A10G": _A10,
    "Tesla T4": {"fp16": 65e12, "fp32": 8.1e12},
    "Tesla V100-SXM2-16GB": _V100_SXM,
    "Tesla V100-SXM2-32GB": _V100_SXM,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
}

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# The analysis module's DeviceProfile names dtypes the long way.
_LONG_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "tf32": "tf32"}


def _profile_peaks(profile: Any) -> dict[str, float]:
    """{bf16|fp16|tf32|fp32: FLOP/s} from a mapping or an analysis DeviceProfile (``.peak_flops``)."""
    peaks = getattr(profile, "peak_flops", profile)
    return {_LONG_NAMES.get(k, k): float(v) for k, v in peaks.items() if v}


def matmul_precision(precision: str, device: Union[torch.device, str] = "cuda") -> str:
    """The precision matmuls run at for a job's ``schedule.precision``: fp32 is tf32 on a GPU that allows TF32."""
    if precision != "fp32" or torch.device(device).type != "cuda":
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device: Union[torch.device, str], dtype: Union[str, torch.dtype],
               profile: Any = None) -> Optional[float]:
    """Dense peak FLOP/s of ``device`` at ``dtype`` ("bf16", "fp16", "tf32", "fp32"), or None when unknown.

    ``profile`` is a calibration of this device - a {dtype: FLOP/s} mapping
    or a :class:`gradyard.analysis.calibrate.DeviceProfile`; it wins over the
    table and is the only source on CPU.  A dtype the profile did not
    measure has no peak: borrowing fp32's for tf32 would overstate MFU.
    """
    device = torch.device(device)
    key = _DTYPES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else _LONG_NAMES.get(str(dtype), str(dtype))
    if profile is not None:
        return _profile_peaks(profile).get(key)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    row = PEAK_FLOPS.get(torch.cuda.get_device_name(device))
    if row is None:
        return None
    if key == "tf32" and "tf32" not in row:
        key = "fp32"  # no TF32 units: fp32 matmuls run at the fp32 rate
    return row.get(key)


class FlopsMonitor(Callback):
    """Counts FLOPs on measured steps and turns the step timer's step times into achieved FLOP/s and MFU."""

    name = "flops_monitor"
    critical = False
    events = frozenset((Event.BEFORE_FORWARD, Event.AFTER_BACKWARD, Event.FIT_START, Event.FIT_END))

    def __init__(self, metrics: TelemetryMetrics, every: int = 500, peak_profile: Any = None, window: int = 50):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.metrics = metrics
        self.every = every
        self.peak_profile = peak_profile
        self.step_flops: Optional[float] = None
        self.peak: Optional[float] = None
        self.measured_this_step = False
        self.window: deque[float] = deque(maxlen=window)
        """Seconds of the latest undisturbed steps (for achieved FLOP/s); kept in checkpoints."""
        self._mode: Optional[CensusMode] = None
        self._device_type = "cpu"

    def on_event(self, event: Event, state: Any) -> None:
        if event is Event.BEFORE_FORWARD:
            self.measured_this_step = self.step_flops is None or state.step % self.every == 0
            if self.measured_this_step:
                state.timer.disturb()
                self._mode = CensusMode()
                self._mode.__enter__()
        elif event is Event.AFTER_BACKWARD:
            self._stop()
        elif event is Event.FIT_START:
            self._start(state)
        elif event is Event.FIT_END:  # the step timer has resolved the last steps first
            self.metrics.publish()

    def _start(self, state: Any) -> None:
        m = self.metrics
        m.bind(identity_labels(state))
        self._device_type = torch.device(state.device).type
        dtype = matmul_precision(state.spec.schedule.precision, state.device)
        self.peak = peak_flops(state.device, dtype, self.peak_profile)
        if self.peak is not None:
            m.child(m.peak_flops).set(self.peak)
        else:
            log.info("no peak FLOP/s known for %s at %s: MFU not exported", state.device, dtype)
        state.timer.subscribe(self._step_time)

    def _stop(self) -> None:
        mode, self._mode = self._mode, None
        if mode is None:
            return
        mode.__exit__(None, None, None)
        self.step_flops = float(Census(self._device_type, ops=list(mode.stats.values())).model_flops)
        self.metrics.child(self.metrics.step_flops).set(self.step_flops)

    def _step_time(self, step: StepTimes) -> None:
        if step.disturbed:
            return
        self.window.append(step.step_s)
        mean = sum(self.window) / len(self.window)
        if not self.step_flops or mean <= 0:
            return
        m = self.metrics
        achieved = self.step_flops / mean
        m.put(m.achieved_flops, achieved)
        if self.peak:
            m.put(m.mfu, achieved / self.peak)
        m.publish_due()

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.extend(float(x) for x in state.get("window", []))

    def close(self) -> None:
        self._stop()
