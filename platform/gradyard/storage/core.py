"""Storage is always a pair: an fsspec filesystem and a path on it.

Local paths, ``file://`` and ``s3://`` (AWS or any S3-compatible endpoint:
MinIO, Ceph, moto) look the same to the rest of gradyard.  Names say which
side a path lives on: ``*_path`` is a path on ``Storage.fs`` (no protocol),
``url`` is what users see (never with credentials in it).

Every remote read and write of gradyard goes through here: checkpoints, run
records, analysis files, data staging and pretrained weights.  One endpoint
resolution (:func:`resolve_endpoint`), one retry policy
(:mod:`gradyard.storage.retry`), one redaction (:mod:`gradyard.storage.redact`).

Credentials come from the standard AWS chain only (environment, profile,
instance role), so no secret is ever held in a job spec, a pickled
filesystem handed to Ray, or a log line.

Over 350 lines because it is the whole seam: one ``Storage`` (filesystem and path) with every read,
write, exclusive create and listing gradyard makes, and the one place a URL becomes a filesystem.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from gradyard.storage import retry
from gradyard.storage import transfer as _transfer
from gradyard.storage.redact import redact
from gradyard.storage.urls import problem, scheme

if TYPE_CHECKING:
    import fsspec


class StorageError(Exception):
    """Storage that cannot be used; the message names the URL without credentials."""


class RecordError(StorageError):
    """A JSON record on storage that exists but cannot be read (torn, truncated, not JSON)."""


@dataclass
class Storage:
    fs: "fsspec.AbstractFileSystem"
    root_path: str
    """Path on ``fs`` (no protocol) of this location."""
    url: str
    """The location as the user wrote it, for messages."""
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    transfer: _transfer.Transfer = _transfer.Transfer()
    """Part size and parts in flight of large reads and writes (:mod:`gradyard.storage.transfer`)."""

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protocols or "local" in protocols

    @property
    def shown(self) -> str:
        """The URL for messages: redacted."""
        return redact(self.url)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root_path, *parts)

    def child(self, *parts: str) -> "Storage":
        return Storage(self.fs, self.join(*parts), self.url.rstrip("/") + "/" + "/".join(parts),
                       self.endpoint_url, self.region, self.transfer)

    def spec(self) -> dict:
        """What a worker needs to rebuild this storage (no credentials).

        Local paths travel as absolute paths: a worker's working directory is
        not the driver's.
        """
        url = self.root_path if self.is_local else self.url
        return {"url": url, "endpoint_url": self.endpoint_url, "region": self.region}

    def to_pyarrow(self):
        """The same location as a pyarrow filesystem, for Ray Train's RunConfig."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    # ------------------------------------------------------------ reads and writes, retried

    def read_bytes(self, path: str, policy: retry.RetryPolicy = retry.DEFAULT) -> bytes:
        """The whole object at ``path`` (a path on ``fs``); FileNotFoundError when there is none.

        On S3 one GET, nothing else (s3fs's ``cat_file`` asks for the size first, a HEAD per read).
        """
        if self.is_local:
            def get() -> bytes:
                return self.fs.cat_file(path)
        else:
            from fsspec.asyn import sync

            bucket, _, key = path.partition("/")

            async def fetch() -> bytes:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    return await body.read()

            def get() -> bytes:
                return sync(self.fs.loop, fetch)

        return retry.call(get, what=f"read {self._shown_path(path)}", policy=policy)

    def write_bytes(self, path: str, data: bytes, policy: retry.RetryPolicy = retry.DEFAULT) -> None:
        """Write ``data`` at ``path`` so that a reader sees all of it or nothing.

        Local disk: a temporary file in the same folder, synced, then ``os.replace``d
        over ``path`` (and the folder synced).  Object storage: one PUT (or one
        multipart upload of concurrent parts), which S3 makes visible only once complete.
        """
        if self.is_local:
            retry.call(lambda: _named(path, write_local_atomically, path, data),
                       what=f"write {self._shown_path(path)}", policy=policy)
        else:
            _transfer.upload(self, path, data, policy)

    def open_upload(self, path: str, policy: retry.RetryPolicy = retry.DEFAULT) -> "_transfer.PartUpload":
        """A write-only stream to the object at ``path`` (S3): parts upload as they fill, the object
        appears whole at ``close()`` (see :class:`gradyard.storage.transfer.PartUpload`)."""
        return _transfer.PartUpload(self, path, policy)

    def read_hashed(self, path: str, size: int, policy: retry.RetryPolicy = retry.DEFAULT) -> tuple[bytes, str]:
        """(the ``size`` bytes at ``path``, their sha256), read once, in concurrent parts on S3.

        FileNotFoundError when there is none; :class:`~gradyard.storage.transfer.SizeMismatch`
        when the object has another size (see :func:`gradyard.storage.transfer.read_hashed`).
        """
        return _transfer.read_hashed(self, path, size, policy)

    def create_exclusive(self, path: str, data: bytes, policy: retry.RetryPolicy = retry.DEFAULT) -> bool:
        """Write ``data`` at ``path`` only if nothing is there; False when something already was.

        Local disk: the data goes to a synced temporary file, then ``os.link``
        names it (link fails if the name exists: an atomic create-exclusive with
        its content).  S3: a conditional PUT (``If-None-Match: *``).
        """
        shown = self._shown_path(path)
        if self.is_local:
            def create() -> bool:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = _temp_name(path)
                _named(path, write_local_durably, tmp, data, drop_cache=False)
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
                    sync_dir(os.path.dirname(path))

            return retry.call(create, what=f"create {shown}", policy=policy)

        def put() -> bool:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False

        return retry.call(put, what=f"create {shown}", policy=policy)

    def read_json(self, path: str, policy: retry.RetryPolicy = retry.DEFAULT) -> Optional[Any]:
        """The JSON document at ``path``; None when there is none; RecordError when it cannot be read."""
        try:
            blob = self.read_bytes(path, policy)
        except FileNotFoundError:
            return None
        try:
            return json.loads(blob)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordError(f"{self._shown_path(path)} is not readable JSON ({len(blob)} bytes: "
                              f"{type(exc).__name__}: {exc})") from None

    def write_json(self, path: str, data: Any, policy: retry.RetryPolicy = retry.DEFAULT) -> None:
        """``data`` as JSON at ``path``, atomically (see :meth:`write_bytes`)."""
        self.write_bytes(path, dumps(data), policy)

    def exists(self, path: str) -> bool:
        return retry.call(lambda: self.fs.exists(path), what=f"look up {self._shown_path(path)}")

    def remove(self, paths: list[str] | str, recursive: bool = False) -> None:
        """Delete ``paths``; a path already gone is not an error."""
        def rm() -> None:
            try:
                self.fs.rm(paths, recursive=recursive)
            except FileNotFoundError:
                pass

        retry.call(rm, what=f"remove {self._shown_path(paths if isinstance(paths, str) else paths[0])}")

    def _shown_path(self, path: str) -> str:
        # String arithmetic, not posixpath.relpath: that consults the working directory, which an S3
        # path has nothing to do with (and a Ray job's may be gone).
        root = self.root_path.rstrip("/")
        rel = path[len(root):].lstrip("/") if path == root or path.startswith(root + "/") else path
        return self.shown.rstrip("/") + ("/" + rel if rel else "")


def _named(path: str, fn, *args, **kwargs):
    """``fn(*args)``, with an OSError that names ``path`` (its errno kept: retries decide by it)."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        if exc.filename or str(path) in str(exc):
            raise
        raise type(exc)(exc.errno, f"{exc.strerror or exc}: {path}") from exc


def dumps(data: Any) -> bytes:
    """The one JSON encoding of gradyard's records: sorted keys, indented, UTF-8."""
    return json.dumps(data, indent=1, sort_keys=True, default=str).encode()


# ------------------------------------------------------------------ local files


def _temp_name(path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


def write_local_durably(path: str, data, drop_cache: bool = True) -> None:
    """Write a local file and sync it to disk; optionally drop it from the page cache.

    Synced before anything that names it is published, a file survives a
    machine crash, not only a process's.  Dropping the written pages keeps
    checkpoints from pushing the training data out of the page cache, and the
    next checkpoint reuses the freed pages (docs/checkpoints.md measures it).
    """
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_local_atomically(path: str, data: bytes) -> None:
    """``path`` holds all of ``data`` or its old content, never part of either."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_name(path)
    try:
        write_local_durably(tmp, data, drop_cache=False)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    sync_dir(os.path.dirname(path) or ".")


def sync_dir(path: str) -> None:
    """Make a directory's entries (files just created or renamed in it) durable; POSIX only."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



# ------------------------------------------------------------------ opening


def resolve_endpoint(endpoint_url: Optional[str]) -> Optional[str]:
    """The S3 endpoint: the job's ``storage.endpoint_url``, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def open_storage(url: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> Storage:
    """Resolve a URL into (filesystem, path); refuses what :mod:`gradyard.storage.urls` refuses."""
    why = problem(url)
    if why is not None:
        raise StorageError(f"{redact(url)}: {why}")
    kind = scheme(url)
    if kind in ("s3", "s3a"):
        import s3fs

        endpoint = resolve_endpoint(endpoint_url)
        client_kwargs = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if region:
            client_kwargs["region_name"] = region
        # skip_instance_cache: a fresh client per Storage, so a changed endpoint or
        # environment is honoured.  One attempt in botocore and s3fs: the retry
        # loop is gradyard's own (gradyard.storage.retry), with its budget.
        # botocore's ``max_attempts`` counts retries (1 = two attempts); ``total_max_attempts``
        # counts attempts.
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True,
                               config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"},
                                              "connect_timeout": 5, "read_timeout": 30})
        fs.retries = 1
        path = url.split("://", 1)[1].rstrip("/")
        return Storage(fs, path, url.rstrip("/"), endpoint, region)
    import fsspec

    local = url[len("file://"):] if kind == "file" else url
    local = os.path.abspath(os.path.expanduser(local))
    return Storage(fsspec.filesystem("file", auto_mkdir=True), local, url.rstrip("/") or url, None, None)


def storage_from_spec(d: dict) -> Storage:
    return open_storage(d["url"], d.get("endpoint_url"), d.get("region"))


def check_storage(storage: Storage) -> None:
    """Fail fast, before any worker starts: endpoint reachable, bucket present, writable.

    Writes and removes a marker file, like Ray Train's storage validation.
    """
    where = storage.shown
    if storage.endpoint_url:
        where += f" (endpoint {redact(storage.endpoint_url)})"
    marker = storage.join(f".gradyard-write-check-{uuid.uuid4().hex[:8]}")
    try:
        if not storage.is_local:
            _head_bucket(storage, where)
        storage.fs.makedirs(storage.root_path, exist_ok=True)
        storage.fs.pipe_file(marker, b"gradyard")
        storage.fs.rm(marker)
    except StorageError:
        raise
    except PermissionError as exc:
        raise StorageError(f"{where}: no permission to write ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - every failure here becomes one clear message
        reason = redact(str(exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "AccessDenied" in reason or "Forbidden" in reason or "403" in reason:
            raise StorageError(f"{where}: no permission to write ({reason})") from None
        if "NoSuchBucket" in reason:
            raise StorageError(f"{where}: bucket does not exist ({reason})") from None
        raise StorageError(f"{where}: storage is not reachable or not writable ({reason})") from None


def _head_bucket(storage: Storage, where: str) -> None:
    """HEAD the bucket: tells an unreachable endpoint, a missing bucket and a denial apart.

    (``s3fs.exists`` answers False to all three.)
    """
    from fsspec.asyn import sync

    fs = storage.fs
    bucket = storage.root_path.split("/", 1)[0]
    try:
        sync(fs.loop, fs._call_s3, "head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"{where}: bucket {bucket!r} does not exist") from None
    except PermissionError:
        raise StorageError(f"{where}: no permission to use bucket {bucket!r}") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        reason = redact(str(exc)).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise StorageError(f"{where}: storage is not reachable ({reason})") from None

