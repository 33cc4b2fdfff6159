"""A census of one real training step: FLOPs, bytes and time per aten operator.

Two passes over two consecutive real steps, neither changing what the step computes:

1. **Counting** (:class:`CensusMode`, a ``TorchDispatchMode``): every aten op
   that runs is recorded with the bytes of its tensor inputs (read) and outputs
   (written), and its FLOPs from ``torch.utils.flop_counter``'s registered
   formulas (matmul, conv, attention).  Pointwise ops are counted at one FLOP
   per output element and reductions at one per input element, which the
   flop counter leaves at zero; ``model_flops`` keeps the registry's count
   alone, the number MFU is defined on.
2. **Timing** (``torch.profiler``): self CPU time per op and, on CUDA, device
   time per op, kernel busy time and exposed NCCL time.

They are separate steps because the counting mode runs Python on every op,
which the profiler would book as op time.  The mode calls each op exactly as
it came (no decomposition, unlike ``FlopCounterMode``), so the step's results
are bitwise the same as without it and a resumed run stays identical.

Longer than 350 lines because the census is one measurement: the counting mode, the byte and
FLOP rules per op class and the profiler pass must agree op by op, so they sit together.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradyard.analysis.opclass import CLASSES, COMMUNICATION, ELEMENTWISE, REDUCTION, op_class, qualified_name
from gradyard.intervals import union_seconds
from gradyard.steptime import time_call

log = logging.getLogger(__name__)

# Ops whose `self` is only written (its old contents are not read).
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "exponential_", "bernoulli_"}
# Ops that allocate or relabel memory without moving data.
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
               "lift_fresh", "detach", "alias", "_local_scalar_dense"}


@dataclass
class OpStat:
    """One operator (at one dtype) over the whole step."""

    op: str
    """Qualified name, as the profiler names it: ``aten::mm``."""
    op_class: str
    dtype: str
    """Dtype of the op's first tensor argument (``float32``, ``bfloat16``...)."""
    count: int = 0
    flops: float = 0.0
    model_flops: float = 0.0
    """FLOPs from ``torch.utils.flop_counter`` formulas only (matmul/conv/attention)."""
    bytes_read: float = 0.0
    bytes_written: float = 0.0

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class OpTime:
    """Profiler self time of one op name over the profiled step."""

    cpu_s: float = 0.0
    device_s: float = 0.0
    count: int = 0


@dataclass
class ClassStat:
    flops: float = 0.0
    model_flops: float = 0.0
    bytes: float = 0.0
    count: int = 0
    cpu_s: float = 0.0
    device_s: float = 0.0

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class Census:
    device_type: str
    """`cpu` or `cuda`: where the step's tensors lived."""
    ops: list[OpStat] = field(default_factory=list)
    times: dict[str, OpTime] = field(default_factory=dict)
    """Profiler self times by op name (aten ops, comm ops, and regions such as autograd nodes)."""
    profiled_wall_s: Optional[float] = None
    """Wall time of the profiled step (profiler overhead included)."""
    device_busy_s: Optional[float] = None
    """CUDA only: time at least one kernel ran during the profiled step."""
    comm_exposed_s: Optional[float] = None
    """CUDA only: NCCL kernel time that no compute kernel overlapped."""
    float32_matmul_precision: str = "highest"
    allow_tf32: bool = False
    uncounted: int = 0
    """Ops whose bytes or FLOPs could not be read (counted as zero)."""

    # -- totals ---------------------------------------------------------
    def _compute_ops(self) -> Iterable[OpStat]:
        return (o for o in self.ops if o.op_class != COMMUNICATION)

    @property
    def n_ops(self) -> int:
        return sum(o.count for o in self.ops)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self._compute_ops())

    @property
    def model_flops(self) -> float:
        return sum(o.model_flops for o in self._compute_ops())

    @property
    def bytes(self) -> float:
        """Bytes read + written by compute ops (communication payload excluded)."""
        return sum(o.bytes for o in self._compute_ops())

    @property
    def comm_bytes(self) -> float:
        """Payload bytes handed to collectives in the step."""
        return sum(o.bytes_read for o in self.ops if o.op_class == COMMUNICATION)

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def dtype(self) -> str:
        """The step's compute dtype: the dtype of most matmul FLOPs, else of most bytes."""
        weight: dict[str, float] = defaultdict(float)
        for o in self._compute_ops():
            weight[o.dtype] += o.model_flops
        if not any(weight.values()):
            for o in self._compute_ops():
                weight[o.dtype] += o.bytes
        weight.pop("", None)
        dt = max(weight, key=weight.get) if weight else "float32"
        if dt == "float32" and self.device_type == "cuda" and self.allow_tf32:
            return "tf32"
        return dt

    def op_totals(self) -> dict[str, OpStat]:
        """Ops merged across dtypes, by name (dtype: the one with most bytes)."""
        merged: dict[str, OpStat] = {}
        for o in sorted(self.ops, key=lambda o: -o.bytes):
            m = merged.setdefault(o.op, OpStat(o.op, o.op_class, o.dtype))
            m.count += o.count
            m.flops += o.flops
            m.model_flops += o.model_flops
            m.bytes_read += o.bytes_read
            m.bytes_written += o.bytes_written
        return merged

    def op_seconds(self, name: str) -> float:
        """Measured time of one op name: device time on CUDA, self CPU time otherwise."""
        t = self.times.get(name)
        if t is None:
            return 0.0
        return t.device_s if self.device_type == "cuda" else t.cpu_s

    def by_class(self) -> dict[str, ClassStat]:
        out = {c: ClassStat() for c in CLASSES}
        for o in self.ops:
            s = out[o.op_class]
            s.flops += o.flops
            s.model_flops += o.model_flops
            s.bytes += o.bytes
            s.count += o.count
        for name, t in self.times.items():
            s = out[op_class(name)]
            s.cpu_s += t.cpu_s
            s.device_s += t.device_s
        return out

    # -- JSON -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ops"] = [dict(dataclasses.asdict(o), intensity=o.intensity) for o in self.ops]
        d["totals"] = {"flops": self.flops, "model_flops": self.model_flops, "bytes": self.bytes,
                       "comm_bytes": self.comm_bytes, "intensity": self.intensity, "n_ops": self.n_ops,
                       "dtype": self.dtype}
        d["by_class"] = {c: dict(dataclasses.asdict(s), intensity=s.intensity) for c, s in self.by_class().items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Census":
        op_fields = {f.name for f in dataclasses.fields(OpStat)}
        return cls(
            device_type=d["device_type"],
            ops=[OpStat(**{k: v for k, v in o.items() if k in op_fields}) for o in d.get("ops", [])],
            times={k: OpTime(**v) for k, v in d.get("times", {}).items()},
            profiled_wall_s=d.get("profiled_wall_s"),
            device_busy_s=d.get("device_busy_s"),
            comm_exposed_s=d.get("comm_exposed_s"),
            float32_matmul_precision=d.get("float32_matmul_precision", "highest"),
            allow_tf32=d.get("allow_tf32", False),
            uncounted=d.get("uncounted", 0),
        )


# ---------------------------------------------------------------------------
# Counting


def _tensor_bytes(t: torch.Tensor) -> int:
    logical = t.numel() * t.element_size()
    try:
        # An expanded tensor reads its storage once, not once per broadcast element.
        return min(logical, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):
        return logical


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class CensusMode(TorchDispatchMode):
    """Records FLOPs and bytes of every aten op; runs each op unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[tuple[str, str], OpStat] = {}
        self.uncounted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._count(func, args, kwargs, out)
        except Exception:  # the census must never break the step it watches
            self.uncounted += 1
        return out

    def _count(self, func, args, kwargs, out) -> None:
        if func.namespace == "profiler":
            return  # record_function markers, not work
        name = qualified_name(func)
        op = name.partition("::")[2]
        cls = op_class(name)
        schema = func._schema

        skip_read: set[int] = set()  # ids of tensors that are only written (out=, copy_ dst)
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            if a.kwarg_only or (i == 0 and op in _WRITE_ONLY_SELF):
                value = args[i] if not a.kwarg_only and i < len(args) else kwargs.get(a.name)
                skip_read.update(id(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))

        inputs = {id(t): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        outputs = {id(t): t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        first = next(iter(inputs.values()), None)
        if first is None:
            first = next(iter(outputs.values()), None)
        dtype = _dtype_name(first) if first is not None else ""

        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if is_view or op in _NO_TRAFFIC:
            read = written = 0
        elif cls == COMMUNICATION:
            read, written = sum(_tensor_bytes(t) for t in inputs.values()), 0  # payload, not memory traffic
        else:
            read = sum(_tensor_bytes(t) for k, t in inputs.items() if k not in skip_read)
            written = sum(_tensor_bytes(t) for t in outputs.values())

        from torch.utils.flop_counter import flop_registry

        model_flops = 0
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            model_flops = int(formula(*args, **kwargs, out_val=out))
        flops = model_flops
        if not model_flops and not is_view:
            if cls == ELEMENTWISE:
                flops = sum(t.numel() for t in outputs.values())
            elif cls == REDUCTION:
                flops = max((t.numel() for t in inputs.values()), default=0)

        s = self.stats.get((name, dtype))
        if s is None:
            s = self.stats[(name, dtype)] = OpStat(name, cls, dtype)
        s.count += 1
        s.flops += flops
        s.model_flops += model_flops
        s.bytes_read += read
        s.bytes_written += written


# ---------------------------------------------------------------------------
# Timing


def _start_profiler(device_type: str) -> Optional[Any]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    prof = profile(activities=acts)
    try:
        prof.__enter__()
    except RuntimeError as e:  # e.g. another profiler already running
        log.warning("census: profiler not started (%s); op times omitted", e)
        return None
    return prof


def _finish_profiler(prof: Any, census: Census, wall_s: float) -> None:
    from torch.autograd import DeviceType

    prof.__exit__(None, None, None)
    times: dict[str, OpTime] = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CPU:
            continue  # kernels: their time is booked to the aten op that launched them
        times[e.key] = OpTime(cpu_s=e.self_cpu_time_total / 1e6, device_s=e.self_device_time_total / 1e6,
                              count=e.count)
    census.times = times
    census.profiled_wall_s = wall_s
    if census.device_type == "cuda":
        kernels, comm = [], []
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                iv = (e.time_range.start / 1e6, e.time_range.end / 1e6)
                (comm if "nccl" in e.name.lower() else kernels).append(iv)
        census.device_busy_s = union_seconds(kernels + comm)
        # Exposed communication: NCCL time during which no compute kernel ran.
        census.comm_exposed_s = max(0.0, census.device_busy_s - union_seconds(kernels)) if comm else 0.0


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()  # sync point: only around the profiled step, so its trace holds that step alone


def _new_census(device_type: str) -> Census:
    return Census(device_type=device_type,
                  float32_matmul_precision=torch.get_float32_matmul_precision(),
                  allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))


def census_of(step_fn: Callable[[], Any], device: Optional[str | torch.device] = None,
              profile_time: bool = True) -> Census:
    """Census of ``step_fn``: one call under :class:`CensusMode` (counts), one under the profiler (times).

    ``step_fn`` runs twice when ``profile_time`` (the default); pass False to run it once, counts only.
    """
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    census = _new_census(device_type)
    mode = CensusMode()
    with mode:
        step_fn()
    census.ops = list(mode.stats.values())
    census.uncounted = mode.uncounted
    if profile_time:
        prof = _start_profiler(device_type)  # before the clock: profiler start-up is not step time
        try:
            wall = time_call(step_fn, device_type)
        except BaseException:
            if prof is not None:
                prof.__exit__(None, None, None)
            raise
        if prof is not None:
            _finish_profiler(prof, census, wall)
    return census


# The callback lives in its own module; imported here too, as the public place to find it.
from gradyard.analysis.callback import CensusCallback  # noqa: E402  (callback imports this module)

__all__ = ["Census", "CensusCallback", "CensusMode", "ClassStat", "OpStat", "OpTime", "census_of"]
