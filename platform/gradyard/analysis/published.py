"""Vendor-published peaks of common data-centre GPUs, for comparison only.

A measured :class:`~gradyard.analysis.calibrate.DeviceProfile` is always what
the analysis divides by; these figures are printed beside it so a reader sees
how far the measured roof sits from the datasheet (clocks, power caps, MIG
slices and PCIe variants all move it).

Peak FLOP/s come from the one table in :mod:`gradyard.telemetry.flops`
(``PEAK_FLOPS``, dense, by ``torch.cuda.get_device_name()``); this module adds
only what that table lacks: peak memory bandwidth, from the same datasheets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Peak device-memory bandwidth, bytes/s, by the names PEAK_FLOPS uses.
#   H100 SXM 3.35 TB/s HBM3, H100 PCIe 2.0 TB/s, H200 4.8 TB/s HBM3e;
#   A100 80GB SXM 2.039 TB/s, 80GB PCIe 1.935 TB/s, 40GB 1.555 TB/s;
#   L40S 864 GB/s, L4 300 GB/s, A10/A10G 600 GB/s, T4 320 GB/s, V100 900 GB/s.
MEM_BANDWIDTH: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100 80GB PCIe": 1.935e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "NVIDIA A100-PCIE-40GB": 1.555e12,
    "NVIDIA L40S": 864e9,
    "NVIDIA L4": 300e9,
    "NVIDIA A10": 600e9,
    "NVIDIA A10G": 600e9,
    "Tesla T4": 320e9,
    "Tesla V100-SXM2-16GB": 900e9,
    "Tesla V100-SXM2-32GB": 900e9,
    "Tesla V100-PCIE-16GB": 900e9,
    "Tesla V100-PCIE-32GB": 900e9,
}

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "tf32": "tf32", "fp32": "float32"}


@dataclass(frozen=True)
class PublishedPeak:
    name: str
    """The device name as CUDA reports it."""
    peak_flops: dict[str, float]
    """Dense peak FLOP/s by the dtype names profiles use (`float32`, `tf32`, `bfloat16`, `float16`)."""
    mem_bandwidth_bytes_per_s: Optional[float]


def published_peak(device_name: str) -> Optional[PublishedPeak]:
    """The datasheet figures for a CUDA device name, or None (CPUs, unlisted GPUs)."""
    from gradyard.telemetry.flops import PEAK_FLOPS

    row = PEAK_FLOPS.get(device_name)
    if row is None:
        return None
    return PublishedPeak(device_name, {_DTYPE_NAMES.get(k, k): v for k, v in row.items()},
                         MEM_BANDWIDTH.get(device_name))
