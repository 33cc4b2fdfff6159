"""The job definition: one YAML file per model, validated by pydantic.

Every field carries its documentation right under it, so this module is the
reference for what a job file may say.  Unknown keys, wrong types and
impossible values are rejected with an error that names the file, the key
path, what is wrong and what is allowed (see :func:`load_job`).

Longer than 350 lines because it is the schema: one section class per part of a job file, each
field with its bound and its docstring (the published schema and docs/jobs.md come from them);
splitting it would spread one reference over several files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gradyard import sources
from gradyard.storage.redact import redact
from gradyard.storage.urls import problem as url_problem

BUILTIN_SOURCES = tuple(sources.BUILTIN)
DATA_FORMATS = tuple(sources.FORMATS)
METRICS = ("test_accuracy", "test_loss", "train_accuracy", "train_loss")
"""Metrics every job reports (accuracies only for classification), for checkpoint.best_metric."""
MAX_SEED = 2 ** 32 - 1
"""Seeds must fit every generator they feed: numpy's and scikit-learn's take 32 bits."""
MAX_LOADER_WORKERS_PER_CORE = 4
MAX_WORKERS = 4096


def _url(key: str, value: Optional[str]) -> Optional[str]:
    if value is not None:
        why = url_problem(value)
        if why is not None:
            raise ValueError(why)
    return value


class JobError(Exception):
    """A job file that cannot be used; the message is meant for the user as is."""


class _Section(BaseModel):
    # allow_inf_nan=False: every float in a job is finite (an lr of inf trains to NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class ModelSection(_Section):
    arch: str
    """Model name from the catalogue (`gradyard jobs` lists them), e.g. `lenet5`."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the model builder (hidden sizes, channels...)."""
    pretrained: Optional[str] = None
    """Path or URL (local, file://, s3://) of pretrained weights; never downloaded from the internet."""

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: Optional[str]) -> Optional[str]:
        return _url("model.pretrained", v)


class DataSection(_Section):
    source: str
    """`circles`, `blobs`, `digits`, `breast_cancer`, `synthetic`, or a URL (local path, file://, s3://)."""
    format: Optional[Literal["idx", "imagefolder", "aclimdb", "mammographic", "csv"]] = None
    """Layout of the data at a URL source; required unless the source is built in or synthetic."""
    batch_size: int = Field(32, ge=1, le=1_000_000)
    """Batch size per worker."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of a built-in set held out for testing."""
    num_samples: Optional[int] = Field(None, ge=8, le=100_000_000)
    """Number of samples generated for `circles`, `blobs` and `synthetic` (train + test)."""
    loader_workers: int = Field(0, ge=0, le=64)
    """DataLoader worker processes per training worker (0 loads in the training process); at most
    4 per CPU core of the machine validating the job."""
    pin_memory: bool = False
    """Pin host memory for faster host-to-GPU copies."""
    image_size: Optional[int] = Field(None, ge=8, le=4096)
    """Side of the square images fed to the model; the model's default when unset."""
    max_length: int = Field(256, ge=8, le=100_000)
    """Tokens per text sample (IMDB); longer reviews are cut, shorter ones padded."""
    vocab_size: int = Field(20000, ge=16, le=10_000_000)
    """Vocabulary size for text data (most frequent training tokens)."""
    cache_dir: Optional[str] = None
    """Node-local folder where remote data is staged once; defaults to ~/.cache/gradyard/data."""
    like: Optional[str] = None
    """`synthetic` only: the data it mimics (a built-in source or a format), so shapes and classes stay those
    of the job's real data; `--set data.source=synthetic` sets it from the source it replaces."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        if v in BUILTIN_SOURCES or v == "synthetic":
            return v
        return _url("data.source", v)

    @field_validator("loader_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        cap = MAX_LOADER_WORKERS_PER_CORE * (os.cpu_count() or 1)
        if v > cap:
            raise ValueError(f"{v} loader processes per training worker is more than {cap} "
                             f"({MAX_LOADER_WORKERS_PER_CORE} per CPU core of this machine); "
                             f"allowed: 0 to {cap}")
        return v

    @field_validator("like")
    @classmethod
    def _like(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in BUILTIN_SOURCES + DATA_FORMATS:
            raise ValueError(f"unknown data {v!r}; allowed: {', '.join(BUILTIN_SOURCES + DATA_FORMATS)}")
        return v

    @property
    def is_url(self) -> bool:
        return self.source not in BUILTIN_SOURCES and self.source != "synthetic"

    @model_validator(mode="after")
    def _format_needed(self) -> "DataSection":
        if self.is_url and self.format is None:
            raise ValueError(
                f"data.format is required when data.source is a URL ({self.source!r}); "
                f"allowed: {', '.join(DATA_FORMATS)}"
            )
        return self


class OptimizerSection(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer: `sgd`, `adam` or `adamw`."""
    lr: float = Field(0.01, gt=0.0, le=100.0)
    """Learning rate."""
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """SGD momentum (ignored by Adam/AdamW, which use `betas`)."""
    nesterov: bool = False
    """Nesterov momentum for SGD (needs momentum > 0)."""
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    """Optimizer weight decay (decoupled for AdamW, L2-in-gradient for SGD/Adam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas."""

    @model_validator(mode="after")
    def _nesterov(self) -> "OptimizerSection":
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs optimizer.name sgd and momentum > 0")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError("betas must each be in [0, 1)")
        return self


class LRSchedulerSection(_Section):
    name: Literal["none", "step", "cosine", "onecycle", "exponential"] = "none"
    """Learning-rate schedule, stepped once per optimizer step."""
    step_size: int = Field(100, ge=1, le=10 ** 12)
    """`step`: optimizer steps between decays."""
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    """`step` / `exponential`: decay factor."""
    warmup_steps: int = Field(0, ge=0, le=10 ** 12)
    """Linear warm-up steps before the schedule (any schedule)."""


class ScheduleSection(_Section):
    epochs: Optional[int] = Field(None, ge=1, le=1_000_000)
    """Train for this many epochs (exactly one of `epochs` and `steps`)."""
    steps: Optional[int] = Field(None, ge=1, le=10 ** 12)
    """Train for this many optimizer steps in total (exactly one of `epochs` and `steps`)."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed for weights, data order, augmentation and dropout (0 to 2**32 - 1)."""
    lr_scheduler: LRSchedulerSection = Field(default_factory=LRSchedulerSection)
    """Learning-rate schedule."""
    eval_every_epochs: int = Field(1, ge=1, le=1_000_000)
    """Evaluate on the test split every N epochs (and always at the end)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; fp16 uses a gradient scaler."""

    @model_validator(mode="after")
    def _one_of(self) -> "ScheduleSection":
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of schedule.epochs and schedule.steps")
        return self


class RegularizationSection(_Section):
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)
    """Dropout probability for models that have dropout layers (the model's default when unset)."""
    batch_norm: Optional[bool] = None
    """Insert batch norm where the model supports it (the model's default when unset)."""
    l1: float = Field(0.0, ge=0.0, le=10.0)
    """L1 penalty: adds l1 * sum(|w|) over weights to the loss."""
    l2: float = Field(0.0, ge=0.0, le=10.0)
    """L2 penalty: adds l2 * sum(w^2) over weights to the loss (see optimizer.weight_decay for decay)."""


class Flip(_Section):
    name: Literal["flip"]
    """Horizontal flip."""
    p: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of a horizontal flip."""


class Rotation(_Section):
    name: Literal["rotation"]
    """Random rotation."""
    degrees: float = Field(15.0, gt=0.0, le=180.0)
    """Maximum rotation either way, in degrees."""


class ColorJitter(_Section):
    name: Literal["color_jitter"]
    """Random brightness, contrast, saturation and hue."""
    brightness: float = Field(0.2, ge=0.0, le=10.0)
    """Brightness factor range around 1."""
    contrast: float = Field(0.2, ge=0.0, le=10.0)
    """Contrast factor range around 1."""
    saturation: float = Field(0.2, ge=0.0, le=10.0)
    """Saturation factor range around 1."""
    hue: float = Field(0.0, ge=0.0, le=0.5)
    """Hue shift range."""


class TrivialAugmentWide(_Section):
    name: Literal["trivial_augment_wide"]
    """TrivialAugment Wide (Müller and Hutter, 2021)."""
    num_magnitude_bins: int = Field(31, ge=2, le=1024)
    """Number of magnitude levels."""


class RandAugment(_Section):
    name: Literal["rand_augment"]
    """RandAugment (Cubuk et al., 2020)."""
    num_ops: int = Field(2, ge=1, le=16)
    """Transforms applied in sequence."""
    magnitude: int = Field(9, ge=0, le=30)
    """Magnitude of each transform."""


Augmentation = Annotated[
    Union[Flip, Rotation, ColorJitter, TrivialAugmentWide, RandAugment],
    Field(discriminator="name"),
]


class ScalingSection(_Section):
    num_workers: Union[int, tuple[int, int]] = 1
    """Training workers (DDP ranks); `[min, max]` enables Ray Train elastic training."""
    use_gpu: bool = False
    """One GPU per worker; NCCL instead of gloo."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Ray resources each worker reserves, e.g. `{CPU: 2, GPU: 1}` (each 0 to 1,000,000)."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement strategy of the workers' placement group (Ray's `placement_strategy`)."""
    resource_wait_s: float = Field(600.0, ge=0.0, le=86_400)
    """Seconds to wait for nodes an autoscaler may add.  Before any worker starts, the driver checks
    that the cluster's nodes can hold the workers (the minimum of a `[min, max]`): a job that never
    can fails at once, naming the key to change; one that only added nodes would hold waits up to
    this long for them, saying every 30 s what it waits for, then fails (0: no waiting)."""

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        if isinstance(v, int):
            if not 1 <= v <= MAX_WORKERS:
                raise ValueError(f"{v} workers; allowed: 1 to {MAX_WORKERS}")
        else:
            lo, hi = v
            if lo < 1 or hi < lo or hi > MAX_WORKERS:
                raise ValueError(f"a range [min, max] needs 1 <= min <= max <= {MAX_WORKERS}")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if not name or not name.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum():
                raise ValueError(f"resource name {name!r} is not a Ray resource name (letters, digits, _ - . /)")
            if not 0 <= amount <= 1_000_000:
                raise ValueError(f"{name}: {amount} is not an amount of a resource; allowed: 0 to 1,000,000")
        return v

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]


class StorageSection(_Section):
    url: str = "./runs"
    """Where run directories live: a local path, file:// or s3://bucket/prefix; the run is at URL/<job name>."""
    endpoint_url: Optional[str] = None
    """S3-compatible endpoint (MinIO, Ceph): http(s)://host[:port]; defaults to AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL."""
    region: Optional[str] = Field(None, pattern=r"^[a-z0-9-]{1,32}$")
    """S3 region; defaults to the AWS chain's."""
    shared: bool = False
    """A local `url` is a filesystem every node mounts (NFS, Lustre...): allow it for workers on several nodes."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _url("storage.url", v)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL of an S3-compatible endpoint")
        if "@" in parts.netloc:
            raise ValueError("must not carry credentials (user:password@); give them through the AWS chain")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query string or fragment")
        return v


class CheckpointSection(_Section):
    every_steps: Optional[int] = Field(None, ge=1, le=10 ** 12)
    """Checkpoint every N optimizer steps."""
    every_seconds: Optional[float] = Field(None, ge=1.0, le=10 ** 7)
    """Checkpoint when this many seconds have passed since the last one (rank 0's clock decides)."""
    keep: int = Field(3, ge=1, le=10_000)
    """Keep the newest N verified checkpoints of the run's own lineage."""
    best_metric: Optional[Literal["test_accuracy", "test_loss", "train_accuracy", "train_loss"]] = None
    """Also keep the best checkpoint by this metric (accuracies only for classification)."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller `best_metric` is better."""
    at_epoch_end: bool = True
    """Also checkpoint at the end of every epoch."""


class FailureSection(_Section):
    max_failures: int = Field(3, ge=-1, le=100_000)
    """Worker-group restarts Ray Train may make before the job fails (-1: unlimited)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or inf loss: `stop` (say at which step, never checkpoint that state) or `skip` the step's update
    (agreed by every rank each step, which costs a sync point) and count it."""
    hang_timeout_s: Optional[float] = Field(120.0, ge=1.0, le=86_400)
    """Floor of the hang bound: a rank that has not arrived at a step's collectives for max(this,
    hang_factor x recent step time) is reported and the worker group restarts; null turns detection off."""
    hang_factor: float = Field(20.0, ge=2.0, le=10_000)
    """Multiple of the recent median step time a step may take before it counts as hung."""
    preemption_grace_s: float = Field(30.0, ge=1.0, le=3600)
    """After a SIGTERM, how long a worker may take to checkpoint the current step before it exits anyway."""


class TelemetrySection(_Section):
    enabled: bool = True
    """Export step-time, gradient-sync, MFU, memory and GPU metrics to Prometheus."""
    measure_flops_every: int = Field(500, ge=1, le=10 ** 9)
    """Count FLOPs with torch.utils.flop_counter on one step every N steps (and the first)."""
    port: int = Field(0, ge=0, le=65535)
    """Metrics port of each worker's exporter; 0 picks a free one (registered for discovery)."""
    profile_ops: bool = False
    """Also run torch.profiler over one step of the job's census, for per-op times in
    `analysis/step.json`.  Off by default: PyTorch's profiler leaves the thread that ran it
    slower for the rest of the run.  The verdict does without it; `gradyard.analysis.probe`
    profiles a step outside the job."""


class JobSpec(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    """Job name: lowercase letters, digits, '.', '_' and '-'; names the run directory."""
    description: str = ""
    """One line for `gradyard jobs`."""
    model: ModelSection
    """The network: an architecture from the catalogue (`gradyard jobs`) and its parameters."""
    data: DataSection
    """The dataset: a built-in source, `synthetic`, or files in a format gradyard reads."""
    loss: Literal["auto", "cross_entropy", "bce", "mse"] = "auto"
    """Loss; `auto` picks from the model's task (multiclass: cross entropy, binary: BCE, regression: MSE)."""
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    """Optimizer and learning rate."""
    schedule: ScheduleSection
    """How long to train (epochs or steps), the seed, the LR schedule, precision."""
    regularization: RegularizationSection = Field(default_factory=RegularizationSection)
    """Dropout, batch norm, L1/L2 penalties."""
    augmentation: list[Augmentation] = Field(default_factory=list)
    """Training-data augmentations, applied in order (image data only; never to test data)."""
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    """Workers, their resources and placement (Ray Train's ScalingConfig)."""
    storage: StorageSection = Field(default_factory=StorageSection)
    """Where the run directory lives: a path, file:// or s3://."""
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    """When to checkpoint, how many to keep, which metric is best."""
    failure: FailureSection = Field(default_factory=FailureSection)
    """Restarts after a failure, non-finite losses, hangs, preemption."""
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    """Prometheus metrics and the live analysis."""

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the job (what a checkpoint records)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------- loading


def _set_path(doc: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = doc
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise JobError(f"--set {dotted}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides or []:
        if "=" not in item:
            raise JobError(f"--set {redact(item)!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise JobError(f"--set {redact(item)!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if key == "data.source" and value == "synthetic":
            _remember_shapes(doc)
        _set_path(doc, key, value)
    return doc


def _remember_shapes(doc: dict) -> None:
    """``--set data.source=synthetic``: keep the shapes of the data it replaces (``data.like``)."""
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("like") is not None:
        return
    old = data.get("source")
    if old in BUILTIN_SOURCES:
        data["like"] = old
    elif isinstance(data.get("format"), str) and old != "synthetic":
        data["like"] = data["format"]


def _allowed(model_cls: type[BaseModel], loc: tuple) -> str:
    """Names the keys allowed at `loc` (the parent of an unknown key)."""
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int) or cls is None:
            return ""
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if cls is None:
        return ""
    return ", ".join(cls.model_fields)


def format_validation_error(source: str, exc: ValidationError, model_cls=None) -> str:
    model_cls = model_cls or JobSpec
    lines = [f"{source}: invalid job definition"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"])
        # Drop discriminator tags pydantic inserts into the location.
        path = ".".join(str(p) for p in loc if not (isinstance(p, str) and p in (
            *sources.AUGMENTATIONS, "int", "tuple[int,int]")))
        path = path or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _allowed(model_cls, loc[:-1])
            msg = f"unknown key; allowed here: {allowed}" if allowed else "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "literal_error":
            msg = f"{err['msg'][0].lower()}{err['msg'][1:]} (got {err.get('input')!r})"
        elif kind == "union_tag_invalid":
            msg = (f"unknown augmentation {err.get('ctx', {}).get('tag')!r}; allowed: "
                   f"{', '.join(sources.AUGMENTATIONS)}")
        elif kind == "union_tag_not_found":
            msg = "each augmentation needs a `name`"
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"{err['msg'][0].lower()}{err['msg'][1:]}{shown}"
            if msg.startswith("value error, "):
                msg = msg[len("value error, "):]
        lines.append(f"  {path}: {msg}")
    return redact("\n".join(lines))


def parse_job(doc: Any, source: str = "<job>") -> JobSpec:
    if not isinstance(doc, dict):
        raise JobError(f"{source}: a job file must be a YAML mapping, got {type(doc).__name__}")
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise JobError(format_validation_error(source, exc)) from None
    # Cross-checks against the catalogue and the machine (no torch: gradyard.catalogue).
    from gradyard.catalogue import check_job

    problem = check_job(spec)
    if problem:
        raise JobError(f"{source}: invalid job definition\n  {problem}")
    return spec


def read_job_doc(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise JobError(f"{path}: no such job file")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return doc


def load_job(path: str | Path, overrides: Optional[list[str]] = None) -> JobSpec:
    """Read, override and validate a job file; raises JobError with a user-facing message."""
    doc = read_job_doc(path)
    if isinstance(doc, dict):
        doc = apply_overrides(doc, overrides or [])
    return parse_job(doc, str(path))
