"""Turn a data URL into a local path, copying remote data once per node, and never outside its cache.

Local paths and file:// URLs are used where they are.  ``s3://`` data is
copied through the storage seam (:mod:`gradyard.storage`: the job's endpoint,
the retry policy, redacted messages) into ``<cache>/<sha256 of the URL>``; a
lock file makes the workers of one node wait for the first one's copy instead
of each copying, and a marker file tells a finished copy from an interrupted one.

Object keys come from whoever wrote the bucket, so each is checked before
anything is written: a key with an empty, ``.`` or ``..`` component, a
backslash or a NUL is refused with an error naming it, and every target is
resolved and must lie inside the staging folder.  All keys are checked before
the first byte is copied, so a bad key writes nothing at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

from gradyard.data.base import FALLBACK, DataError
from gradyard.progress import Progress
from gradyard.storage import Storage, StorageError, open_storage, redact
from gradyard.storage import retry
from gradyard.storage.urls import is_remote

DEFAULT_CACHE = "~/.cache/gradyard/data"
_DONE = ".gradyard-staged"


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def stage(url: str, *, cache_dir: Optional[str] = None, endpoint_url: Optional[str] = None,
          region: Optional[str] = None, expected: str = "data") -> Path:
    """A local path holding the data at ``url`` (a folder or a single file).

    ``expected`` describes what should be there, for the error when nothing is.
    """
    missing = f"data.source: nothing at {redact(url)} (expected {expected}). {FALLBACK}"
    if not is_remote(url):
        path = local_path(url)
        if not path.exists():
            raise DataError(missing)
        return path
    try:
        storage = open_storage(url, endpoint_url, region)
    except StorageError as exc:
        raise DataError(f"data.source: {exc}") from None
    root = Path(cache_dir or DEFAULT_CACHE).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (dest / _DONE).exists():
            _copy(storage, dest, missing)
    name = storage.root_path.rstrip("/").rsplit("/", 1)[-1]
    return dest / name if (dest / name).is_file() else dest


def safe_relative(key: str, base: str) -> str:
    """The part of object key ``key`` below ``base``; DataError when it could name a place outside."""
    rel = key[len(base):].lstrip("/") if key.startswith(base) else key
    parts = rel.split("/")
    if (not rel or "\x00" in rel or "\\" in rel or rel.startswith("/")
            or any(p in ("", ".", "..") for p in parts)):
        raise DataError(f"data.source: object key {redact(key)!r} is not a plain relative path "
                        "(empty, '.' or '..' parts, a backslash or a NUL); gradyard does not stage it. "
                        "Rename the object, or point data.source below it")
    return rel


def _copy(storage: Storage, dest: Path, missing: str) -> None:
    fs, remote = storage.fs, storage.root_path.rstrip("/")
    try:
        is_dir = retry.call(lambda: fs.isdir(remote), what=f"look up {storage.shown}")
        if not is_dir and not retry.call(lambda: fs.isfile(remote), what=f"look up {storage.shown}"):
            raise FileNotFoundError(remote)
        keys = retry.call(lambda: fs.find(remote), what=f"list {storage.shown}") if is_dir else [remote]
    except FileNotFoundError:
        raise DataError(missing) from None
    partial = Path(f"{dest}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    inside = partial.resolve()
    targets = []
    for key in keys:
        rel = safe_relative(key, remote) if is_dir else key.rsplit("/", 1)[-1]
        target = (partial / rel).resolve()
        if os.path.commonpath([inside, target]) != str(inside):
            raise DataError(f"data.source: object key {redact(key)!r} would be written outside the "
                            "staging folder; gradyard does not stage it")
        targets.append(str(target))
    partial.mkdir(parents=True)
    for t in targets:
        Path(t).parent.mkdir(parents=True, exist_ok=True)
    if keys:
        # One batched call: s3fs fetches the files concurrently; a line of progress every few seconds.
        progress = Progress(f"staging {storage.shown}", len(keys), "files")

        def get() -> None:
            progress.value = 0  # a retry copies every file again
            fs.get(list(keys), targets, callback=progress)

        retry.call(get, what=f"stage {storage.shown} ({len(keys)} files)")
        progress.done()
    (partial / _DONE).write_text(redact(storage.url) + "\n")
    shutil.rmtree(dest, ignore_errors=True)  # an interrupted earlier copy
    partial.rename(dest)
