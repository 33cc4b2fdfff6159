"""The checkpoint format: names, the manifest, listing and verification.

Layout of one run directory (a :class:`~gradyard.storage.Storage`)::

    <run>/checkpoints/step_000000120/
        model.pt        plain state_dict of the unwrapped model
        optimizer.pt    optimizer state_dict
        state.pt        trainer state (epoch, step, position in the epoch, LR
                        scheduler, grad scaler, metrics, history), every rank's
                        RNG states, callbacks' state, and the job spec (URLs redacted)
        manifest.json   size and sha256 of each file above, the run id and
                        attempt that wrote it; written last: the commit point

A directory is *published* once its manifest exists, and a published
checkpoint is never written to again: a step written a second time (a resume
from an older checkpoint that reaches the same step) gets a fresh directory,
``step_000000120-<suffix>``.  A checkpoint without a manifest is
*incomplete*; one whose manifest cannot be read, or whose files do not match
it, is *corrupt*.  Neither is ever loaded.  All files load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from gradyard.progress import Progress
from gradyard.storage import DEFAULT, PATIENT, RecordError, RetryPolicy, SizeMismatch, Storage
from gradyard.storage import retry

FORMAT_VERSION = 2
"""2: manifests carry run_id, attempt and world_size; state.pt keeps callbacks' state at its top level.
Version 1 checkpoints (no lineage) still list, verify and load."""
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
FILES = ("model.pt", "optimizer.pt", "state.pt")
"""The files of a checkpoint, in the order they are written."""
PARTIAL_PREFIX = ".partial-"
"""Local disk: a checkpoint is assembled under this name and renamed into place when complete."""

_NAME = re.compile(r"^step_(\d{9,})(?:-([A-Za-z0-9]{1,32}))?$")

COMPLETE, INCOMPLETE, CORRUPT = "complete", "incomplete", "corrupt"


class CorruptCheckpoint(Exception):
    """A checkpoint whose bytes do not match its manifest (the message says which file and how)."""


def checkpoint_dirname(step: int, suffix: Optional[str] = None) -> str:
    return f"step_{step:09d}" + (f"-{suffix}" if suffix else "")


def parse_dirname(name: str) -> Optional[int]:
    """The step of a checkpoint directory name, or None if it is not one."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


@dataclass
class CheckpointInfo:
    step: int
    path: str
    """Path of the checkpoint directory on the run's filesystem."""
    status: str = INCOMPLETE
    """complete, incomplete (no manifest: never finished) or corrupt (unreadable manifest, files do not match)."""
    epoch: Optional[int] = None
    time: Optional[float] = None
    size_bytes: int = 0
    metrics: dict = field(default_factory=dict)
    problem: str = ""
    run_id: Optional[str] = None
    """The run (lineage) that wrote it; None for format-1 checkpoints."""
    attempt: Optional[int] = None
    files: dict = field(default_factory=dict)
    """name -> {"size", "sha256"} from the manifest."""
    verified: bool = False
    """Every file's sha256 was checked (not only its size)."""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def lineage(self, run_id: Optional[str]) -> str:
        """``own`` (written by run ``run_id``), ``foreign`` (by another run) or ``unknown`` (format 1)."""
        if self.run_id is None:
            return "unknown"
        return "own" if run_id is not None and self.run_id == run_id else "foreign"

    def to_json(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d


# --------------------------------------------------------------- digests


def tensor_digest(obj: Any) -> str:
    """sha256 over a nested state's tensors and values, independent of pickling."""
    import torch

    h = hashlib.sha256()

    def walk(o: Any, prefix: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{prefix}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{prefix}[{i}]")
        else:
            h.update(f"{prefix}={o!r}".encode())

    walk(obj, "")
    return h.hexdigest()


# --------------------------------------------------------------- listing


def _apply_manifest(info: CheckpointInfo, manifest: Any) -> bool:
    """Fill ``info`` from a manifest; False (and corrupt) when the manifest is not one."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()):
        info.status, info.problem = CORRUPT, f"{MANIFEST} does not list the checkpoint's files"
        return False
    info.files = files
    info.epoch = manifest.get("epoch")
    info.time = manifest.get("time")
    info.metrics = manifest.get("metrics") or {}
    info.run_id = manifest.get("run_id")
    info.attempt = manifest.get("attempt")
    return True


def check_sizes(info: CheckpointInfo, sizes: dict[str, int]) -> None:
    """Mark ``info`` complete or corrupt from the sizes of its files (``name -> bytes``)."""
    total = 0
    for name, meta in info.files.items():
        if name not in sizes:
            info.status, info.problem = CORRUPT, f"{name} is missing"
            return
        if sizes[name] != meta["size"]:
            info.status, info.problem = CORRUPT, f"{name} has {sizes[name]} bytes, {MANIFEST} says {meta['size']}"
            return
        total += sizes[name]
    info.status, info.size_bytes = COMPLETE, total


def scan(storage: Storage, deep: bool = False,
         policy: RetryPolicy = DEFAULT) -> tuple[list[CheckpointInfo], list[str]]:
    """(every checkpoint under ``<run>/checkpoints``, oldest first; abandoned ``.partial-`` folders).

    One recursive listing gives every file's size and one read per manifest
    its content; ``deep`` also hashes every file.  Unreadable manifests make
    corrupt checkpoints, never an error.
    """
    base = storage.join(CHECKPOINTS)
    storage.fs.invalidate_cache(base)  # another process may have written since s3fs listed
    try:
        found = retry.call(lambda: storage.fs.find(base, detail=True), what=f"list {storage.shown}/{CHECKPOINTS}",
                           policy=policy)
    except FileNotFoundError:
        return [], []
    by_dir: dict[str, dict[str, int]] = {}
    prefix = base.rstrip("/") + "/"
    for path, meta in found.items():
        rel = path[len(prefix):] if path.startswith(prefix) else path  # not relpath: no working directory
        if "/" not in rel:
            continue
        d, _, name = rel.partition("/")
        by_dir.setdefault(d, {})[name] = int(meta.get("size") or 0)
    out, partials = [], []
    progress = Progress(f"verifying the checkpoints of {storage.shown}", len(by_dir), "checkpoints") if deep else None
    for d, sizes in by_dir.items():
        if progress is not None:
            progress.advance()
        step = parse_dirname(d)
        if step is None:
            if d.startswith(PARTIAL_PREFIX):
                partials.append(posixpath.join(base, d))
            continue
        info = CheckpointInfo(step=step, path=posixpath.join(base, d))
        if MANIFEST not in sizes:
            info.problem = f"no {MANIFEST}"
            info.size_bytes = sum(sizes.values())
        else:
            try:
                manifest = storage.read_json(posixpath.join(info.path, MANIFEST), policy)
            except RecordError as exc:
                info.status, info.problem = CORRUPT, str(exc).rsplit("/", 1)[-1]
            else:
                if _apply_manifest(info, manifest):
                    check_sizes(info, sizes)
                    if deep and info.status == COMPLETE:
                        try:
                            read_verified(storage, info, policy=policy)
                        except CorruptCheckpoint as exc:
                            info.status, info.problem = CORRUPT, str(exc)
        out.append(info)
    if progress is not None:
        progress.done()
    out.sort(key=lambda i: (i.step, i.time or 0.0))
    return out, partials


def list_checkpoints(storage: Storage, deep: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint of a run, oldest first, with its status (see :func:`scan`)."""
    return scan(storage, deep)[0]


def read_manifest(storage: Storage, info: CheckpointInfo) -> CheckpointInfo:
    """``info`` with its manifest applied (for a checkpoint known by path only)."""
    try:
        manifest = storage.read_json(posixpath.join(info.path, MANIFEST))
    except RecordError as exc:
        info.status, info.problem = CORRUPT, str(exc)
        return info
    if manifest is None:
        info.status, info.problem = INCOMPLETE, f"no {MANIFEST}"
    elif _apply_manifest(info, manifest):
        info.status = COMPLETE
    return info


def read_verified(storage: Storage, info: CheckpointInfo, names: Optional[tuple[str, ...]] = None,
                  digests: Optional[dict] = None, policy: RetryPolicy = PATIENT) -> dict[str, bytes]:
    """The bytes of a checkpoint's files, each checked against its manifest's sha256.

    These are the very bytes a resume loads: each file is hashed as it is read
    into memory (on S3 in concurrent ranged parts, hashed in order as they
    arrive), what was hashed is what is used, and each byte is read once.
    ``digests`` (name -> {"size", "sha256"}) replaces the manifest's, so every
    rank checks against what rank 0 verified.
    """
    expected = digests if digests is not None else info.files
    out: dict[str, bytes] = {}
    for name in names or tuple(expected):
        meta = expected.get(name)
        if meta is None:
            raise CorruptCheckpoint(f"{name} is not in {MANIFEST}")
        try:
            data, digest = storage.read_hashed(posixpath.join(info.path, name), meta["size"], policy)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{name} is missing") from None
        except SizeMismatch as exc:
            raise CorruptCheckpoint(f"{name} has {exc.actual} bytes, {MANIFEST} says {meta['size']}") from None
        if digest != meta["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match its sha256")
        out[name] = data
    info.verified = True
    return out


def load_blobs(blobs: dict[str, bytes]) -> dict[str, Any]:
    """torch.load each verified file (tensors and plain values only, on the CPU)."""
    import io

    import torch

    return {name: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            for name, data in blobs.items()}
