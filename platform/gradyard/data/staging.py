"""Turn a data URL into a local path, copying remote data once per node.

Local paths and file:// URLs are used where they are.  Anything else (s3://,
or any fsspec protocol) is copied into `<cache>/<sha256 of the URL>`; a lock
file makes the workers of one node wait for the first one's copy instead of
each copying, and a marker file tells a finished copy from an interrupted one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

from gradyard.data.base import FALLBACK, DataError

DEFAULT_CACHE = "~/.cache/gradyard/data"
_DONE = ".gradyard-staged"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def stage(url: str, *, cache_dir: Optional[str] = None,
          storage_options: Optional[dict] = None, expected: str = "data") -> Path:
    """A local path holding the data at `url` (a folder or a single file).

    `expected` describes what should be there, for the error when nothing is.
    """
    missing = f"data.source: nothing at {url} (expected {expected}). {FALLBACK}"
    if is_local(url):
        path = local_path(url)
        if not path.exists():
            raise DataError(missing)
        return path
    import fsspec

    fs, remote = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = Path(cache_dir or DEFAULT_CACHE).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (dest / _DONE).exists():
            _copy(fs, remote, dest, missing)
    name = Path(remote.rstrip("/")).name
    return dest / name if (dest / name).is_file() else dest


def _copy(fs, remote: str, dest: Path, missing: str) -> None:
    try:
        is_dir = fs.isdir(remote)
        if not is_dir and not fs.isfile(remote):
            raise FileNotFoundError(remote)
    except FileNotFoundError:
        raise DataError(missing) from None
    partial = Path(f"{dest}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if is_dir:
        base = remote.rstrip("/")
        for f in fs.find(base):
            target = partial / os.path.relpath(f, base)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(target))
    else:
        fs.get_file(remote, str(partial / Path(remote).name))
    (partial / _DONE).write_text(remote + "\n")
    shutil.rmtree(dest, ignore_errors=True)  # an interrupted earlier copy
    partial.rename(dest)
