"""NVML readings of the worker's GPU (pynvml, from nvidia-ml-py), and the GPU's NVML identity.

:meth:`NvmlReader.open` returns None where there is no GPU or NVML cannot
start, and :meth:`NvmlReader.read` leaves out what the GPU does not support
(MIG slices have no utilization, some boards no power reading): missing
readings are absent series, never zeros.

:func:`gpu_identity` names the GPU the way NVIDIA's DCGM exporter labels its
series (``gpu``: the NVML index, ``UUID``: the GPU UUID), so gradyard's series
join with DCGM's.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

# metric name -> help text; values in base units.
READINGS = {
    "gradyard_gpu_utilization_ratio": "Share of the last sample period a kernel ran on the GPU (NVML).",
    "gradyard_gpu_memory_utilization_ratio": "Share of the last sample period device memory was read or written (NVML).",
    "gradyard_gpu_memory_used_bytes": "Device memory in use by all processes (NVML).",
    "gradyard_gpu_power_watts": "Board power draw (NVML).",
    "gradyard_gpu_sm_clock_hertz": "Current SM clock (NVML).",
}


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device: by UUID (robust to CUDA_VISIBLE_DEVICES), else by index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        if not uuid.startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:  # older torch without uuid, or an NVML that does not know it
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and index < len(ids) and ids[index].isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(ids[index]))
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """``(gpu, UUID)`` of a torch device as DCGM exporter labels it: NVML's index and GPU UUID.

    Not torch's index: under CUDA_VISIBLE_DEVICES (or CUDA's default
    fastest-first order) ``cuda:0`` may be NVML's GPU 3.  On a MIG slice both
    name the parent GPU, as DCGM's do (DCGM adds the slice as ``GPU_I_ID``).
    ``("", "")`` on CPU, and where NVML cannot tell (then there is no DCGM to
    join with either).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return "", ""
    return _nvml_identity(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)  # every telemetry callback asks at FIT_START; NVML answers once
def _nvml_identity(index: int) -> tuple[str, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library, no permission
        log.info("NVML unavailable (%s): no gpu/UUID labels", exc)
        return "", ""
    try:
        handle = _nvml_handle(pynvml, torch.device("cuda", index))
        try:
            mig = pynvml.nvmlDeviceIsMigDeviceHandle(handle)
            if getattr(mig, "value", mig):  # a c_uint in nvidia-ml-py
                handle = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        except Exception:  # a driver without MIG
            pass
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        return str(int(pynvml.nvmlDeviceGetIndex(handle))), uuid
    except Exception as exc:
        log.info("no NVML identity for cuda:%d (%s): no gpu/UUID labels", index, exc)
        return "", ""
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


class NvmlReader:
    def __init__(self, pynvml: Any, handle: Any):
        self._nvml = pynvml
        self._handle = handle
        self._closed = False

    @classmethod
    def open(cls, device: torch.device) -> Optional["NvmlReader"]:
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no driver, no library, no permission
            log.info("NVML unavailable (%s): no GPU utilization metrics", exc)
            return None
        try:
            return cls(pynvml, _nvml_handle(pynvml, device))
        except Exception as exc:
            log.info("no NVML handle for %s (%s): no GPU utilization metrics", device, exc)
            pynvml.nvmlShutdown()
            return None

    def read(self) -> dict[str, float]:
        """What NVML can tell now, {metric name: value}; unsupported readings are left out."""
        if self._closed:
            return {}
        nv, h, out = self._nvml, self._handle, {}
        readers = {
            "gradyard_gpu_utilization_ratio": lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
            "gradyard_gpu_memory_utilization_ratio": lambda: nv.nvmlDeviceGetUtilizationRates(h).memory / 100.0,
            "gradyard_gpu_memory_used_bytes": lambda: float(nv.nvmlDeviceGetMemoryInfo(h).used),
            "gradyard_gpu_power_watts": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "gradyard_gpu_sm_clock_hertz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM) * 1e6,
        }
        for name, read in readers.items():
            try:
                out[name] = float(read())
            except Exception:  # NVMLError_NotSupported and friends: leave the series out
                continue
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
