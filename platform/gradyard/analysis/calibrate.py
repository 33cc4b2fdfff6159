"""Measure the roof of the device this process runs on.

``calibrate()`` times four things, each as warm-up runs then the median of
repeats: dense matmul FLOP/s per dtype, memory bandwidth (a large copy and
the STREAM triad ``a = b + s*c``), the cost of dispatching one op on a tiny
tensor, and, when ``torch.distributed`` is initialised, allreduce bus
bandwidth and the latency of a one-float allreduce across the group.  The result is a :class:`DeviceProfile`, cached
as JSON per device name so `gradyard analyze` can reuse it.

Published datasheet peaks (:mod:`gradyard.analysis.published`) are shown
beside a profile for comparison, never used in its place.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gradyard.progress import Progress

PROFILE_DIR_ENV = "GRADYARD_PROFILE_DIR"


@dataclass
class DeviceProfile:
    """What one device measured it can do."""

    device: str
    """Device name: ``torch.cuda.get_device_name()``, or the CPU model plus thread count."""
    device_type: str
    """`cpu` or `cuda`."""
    peak_flops: dict[str, float]
    """Measured dense matmul FLOP/s per dtype (`float32`, `tf32`, `bfloat16`, `float16`); absent dtypes did not run."""
    mem_bandwidth_bytes_per_s: float
    """Best of the copy and triad bandwidths, counting bytes read plus bytes written."""
    dispatch_overhead_s: float
    """Seconds per op for an elementwise op on a tiny tensor: the fixed cost every op pays."""
    allreduce_busbw_bytes_per_s: Optional[float] = None
    """Allreduce bus bandwidth (nccl-tests: algbw x 2(n-1)/n); None without a process group of 2+."""
    allreduce_world_size: Optional[int] = None
    """Group size the allreduce was measured across."""
    allreduce_latency_s: Optional[float] = None
    """Seconds of an allreduce of one float across the group: its fixed cost (synchronisation,
    the backend's round trips), which no bandwidth explains; None without a process group of 2+."""
    mem_bandwidth_detail: dict[str, float] = field(default_factory=dict)
    """Each bandwidth test by name (`copy`, `triad`), bytes/s."""
    threads: Optional[int] = None
    """``torch.get_num_threads()`` during the measurement (CPU numbers depend on it)."""
    measured_at: str = ""
    """UTC ISO-8601 time of the measurement."""
    torch_version: str = torch.__version__
    quick: bool = False
    """Measured with the small `quick` sizes (less accurate)."""

    @property
    def ridge_point(self) -> float:
        """Peak FLOP/s over peak bandwidth (FLOPs/byte), at the fastest measured dtype."""
        return max(self.peak_flops.values()) / self.mem_bandwidth_bytes_per_s

    def peak(self, dtype: str = "float32") -> float:
        """Peak FLOP/s for a dtype; falls back to float32 when that dtype was not measured."""
        return self.peak_flops.get(dtype) or self.peak_flops.get("float32") or max(self.peak_flops.values())

    def ridge(self, dtype: str = "float32") -> float:
        """Ridge point (FLOPs/byte) for one dtype: below it an op is memory-bound, above it compute-bound."""
        return self.peak(dtype) / self.mem_bandwidth_bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ridge_point"] = self.ridge_point
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeviceProfile":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, directory: Optional[os.PathLike] = None) -> Path:
        path = profile_path(self.device, directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # atomic, so a concurrent reader never sees half a file
        return path

    @classmethod
    def load(cls, device: Optional[str] = None, directory: Optional[os.PathLike] = None) -> Optional["DeviceProfile"]:
        """The cached profile of a device (default: this process's device), or None."""
        path = profile_path(device or device_name(), directory)
        if not path.exists():
            return None
        return cls.from_dict(json.loads(path.read_text()))


def profile_dir(directory: Optional[os.PathLike] = None) -> Path:
    if directory is not None:
        return Path(directory)
    env = os.environ.get(PROFILE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "gradyard" / "profiles"


def profile_path(device: str, directory: Optional[os.PathLike] = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") or "device"
    return profile_dir(directory) / f"{slug}.json"


def _resolve(device: Optional[torch.device | str]) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Optional[torch.device | str] = None) -> str:
    """The name profiles are keyed by. CPU names carry the thread count, which changes every number."""
    dev = _resolve(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    return f"{cpu_model()} ({n} thread{'s' if n != 1 else ''})"


def _median_time(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int, inner: int = 1) -> float:
    """Median seconds of one call of ``fn`` (each sample averages ``inner`` back-to-back calls)."""
    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()  # sync point: start the clock with the queue empty
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()  # sync point: CUDA kernels are async; stop the clock when the device is done
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure_matmul_flops(dtype: str, dev: torch.device, quick: bool = False) -> Optional[float]:
    """Dense n x n matmul FLOP/s (2n^3 per matmul), or None where the dtype does not run on the device."""
    if dev.type == "cuda":
        n, inner, repeats = (4096, 10, 5) if quick else (8192, 10, 7)
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return None
    else:
        n, inner, repeats = (1024, 1, 5) if quick else (2048, 1, 5)
    torch_dtype = _DTYPES[dtype]
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        try:
            small = torch.randn(64, 64, device=dev).to(torch_dtype)
            probe_s = _median_time(lambda: small @ small, dev, repeats=1, warmup=1)
        except (RuntimeError, NotImplementedError):
            return None
        # Some CPUs emulate half types very slowly: size the test so it stays bounded.
        while n > 256 and probe_s * (n / 64) ** 3 * (repeats + 1) * inner > 5.0:
            n //= 2
        a = torch.randn(n, n, device=dev).to(torch_dtype)
        b = torch.randn(n, n, device=dev).to(torch_dtype)
        out = torch.empty(n, n, device=dev, dtype=torch_dtype)
        seconds = _median_time(lambda: torch.mm(a, b, out=out), dev, repeats=repeats, warmup=2, inner=inner)
        return 2.0 * n ** 3 / seconds
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def measure_bandwidth(dev: torch.device, quick: bool = False) -> dict[str, float]:
    """Bytes moved per second by a large copy (read + write) and the STREAM triad (2 reads + 1 write)."""
    if dev.type == "cuda":
        nbytes = (256 if quick else 1024) * 2 ** 20
        repeats, inner = 7, 5
    else:
        # Beyond most L2s; on CPUs with huge shared L3 this is partly cache bandwidth, which
        # is also what tensors of this size see in training.
        nbytes = (64 if quick else 256) * 2 ** 20
        repeats, inner = 5, 1
    n = nbytes // 4
    a = torch.empty(n, device=dev)
    b = torch.rand(n, device=dev)
    c = torch.rand(n, device=dev)
    copy_s = _median_time(lambda: a.copy_(b), dev, repeats, warmup=2, inner=inner)
    triad_s = _median_time(lambda: torch.add(b, c, alpha=3.0, out=a), dev, repeats, warmup=2, inner=inner)
    return {"copy": 2 * a.nbytes / copy_s, "triad": 3 * a.nbytes / triad_s}


def measure_dispatch_overhead(dev: torch.device, quick: bool = False) -> float:
    """Seconds per ``torch.add`` on 1-element tensors: pure framework + launch cost."""
    ops = 500 if quick else 2000
    x = torch.ones(1, device=dev)
    y = torch.ones(1, device=dev)

    def many() -> None:
        for _ in range(ops):
            torch.add(x, y)

    return _median_time(many, dev, repeats=5, warmup=1) / ops


def measure_allreduce_busbw(group: Any = None, dev: Optional[torch.device] = None,
                            nbytes: Optional[int] = None, quick: bool = False) -> Optional[float]:
    """Allreduce bus bandwidth across ``group`` (every rank must call); None without a group of 2+.

    nccl-tests definition: algbw = bytes / time, busbw = algbw x 2(n-1)/n, which
    makes the figure comparable to link bandwidth whatever the group size.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world < 2:
        return None
    dev = dev or (_resolve(None) if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    if nbytes is None:
        nbytes = (64 if quick else 256) * 2 ** 20 if dev.type == "cuda" else (8 if quick else 32) * 2 ** 20
    buf = torch.ones(nbytes // 4, device=dev)
    dist.barrier(group)
    seconds = _median_time(lambda: dist.all_reduce(buf, group=group), dev, repeats=5 if quick else 10, warmup=2)
    # Every rank reports the slowest rank's time, so all ranks agree on one number.
    t = torch.tensor([seconds], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    algbw = nbytes / float(t.item())
    return algbw * 2 * (world - 1) / world


def measure_allreduce_latency(group: Any = None, dev: Optional[torch.device] = None,
                              quick: bool = False) -> Optional[float]:
    """Seconds of an allreduce of one float across ``group`` (every rank must call): the fixed cost
    each collective pays whatever its size; the slowest rank's median. None without a group of 2+."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return None
    dev = dev or (_resolve(None) if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    buf = torch.ones(1, device=dev)
    dist.barrier(group)
    seconds = _median_time(lambda: dist.all_reduce(buf, group=group), dev, repeats=5 if quick else 10, warmup=2,
                           inner=10)
    t = torch.tensor([seconds], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def calibrate(device: Optional[torch.device | str] = None, group: Any = None, quick: bool = False) -> DeviceProfile:
    """Measure this device's roof.

    The allreduce is measured only when ``group`` is given (e.g.
    ``dist.group.WORLD``), and then every rank of it must call: a collective
    started by one rank alone would wait forever on the others.
    """
    dev = _resolve(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dtypes = ["float32", "tf32", "bfloat16", "float16"] if dev.type == "cuda" else ["float32", "bfloat16", "float16"]
    peaks = {}
    progress = Progress(f"calibrating {device_name(dev)}", len(dtypes) + 2 + (group is not None), "measurements")
    for dt in dtypes:
        flops = measure_matmul_flops(dt, dev, quick)
        progress.advance()
        if flops is not None:
            peaks[dt] = flops
    bw = measure_bandwidth(dev, quick)
    progress.advance()
    overhead = measure_dispatch_overhead(dev, quick)
    progress.advance()
    busbw = measure_allreduce_busbw(group, dev=None, quick=quick) if group is not None else None
    latency = measure_allreduce_latency(group, quick=quick) if group is not None else None
    if group is not None:
        progress.advance()
    progress.done()
    world = None
    if busbw is not None:
        import torch.distributed as dist
        world = dist.get_world_size(group)
    return DeviceProfile(
        device=device_name(dev),
        device_type=dev.type,
        peak_flops=peaks,
        mem_bandwidth_bytes_per_s=max(bw.values()),
        mem_bandwidth_detail=bw,
        dispatch_overhead_s=overhead,
        allreduce_busbw_bytes_per_s=busbw,
        allreduce_world_size=world,
        allreduce_latency_s=latency,
        threads=torch.get_num_threads() if dev.type == "cpu" else None,
        measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        torch_version=torch.__version__,
        quick=quick,
    )


def load_or_calibrate(device: Optional[torch.device | str] = None, quick: bool = False,
                      directory: Optional[os.PathLike] = None) -> DeviceProfile:
    """The cached profile of this device, else a fresh single-device calibration (saved for next time).

    No group here on purpose: a cache hit on one rank and a miss on another
    would leave the allreduce test waiting forever.  Call ``calibrate(group=...)``
    on every rank instead.
    """
    cached = DeviceProfile.load(device_name(device), directory)
    if cached is not None:
        return cached
    profile = calibrate(device, None, quick)
    profile.save(directory)
    return profile
