"""Storage is always a pair: an fsspec filesystem and a path on it.

Local paths, ``file://`` and ``s3://`` (AWS or any S3-compatible endpoint:
MinIO, Ceph, moto) look the same to the rest of gradyard.  Names say which
side a path lives on: ``*_path`` is a path on ``Storage.fs`` (no protocol),
``url`` is what users see (never with credentials in it).

Credentials come from the standard AWS chain only (environment, profile,
instance role), so no secret is ever held in a job spec, a pickled
filesystem handed to Ray, or a log line.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import fsspec


class StorageError(Exception):
    """Storage that cannot be used; the message names the URL without credentials."""


class TransientStorageError(StorageError):
    """A failure that may pass (HTTP 5xx, dropped connection, throttling): retry."""


_CRED_IN_URL = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)[^/@\s]+@")


def redact(text: str) -> str:
    """Remove credentials from URLs and known secret values from a message."""
    text = _CRED_IN_URL.sub(r"\g<scheme>***@", str(text))
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    return text


@dataclass
class Storage:
    fs: fsspec.AbstractFileSystem
    root_path: str
    """Path on ``fs`` (no protocol) of this location."""
    url: str
    """The location as the user wrote it, for messages."""
    endpoint_url: Optional[str] = None
    region: Optional[str] = None

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protocols or "local" in protocols

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root_path, *parts)

    def child(self, *parts: str) -> "Storage":
        return Storage(self.fs, self.join(*parts), self.url.rstrip("/") + "/" + "/".join(parts),
                       self.endpoint_url, self.region)

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


def _endpoint(endpoint_url: Optional[str]) -> Optional[str]:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def open_storage(url: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> Storage:
    """Resolve a URL into (filesystem, path)."""
    if not url:
        raise StorageError("storage URL is empty")
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        endpoint = _endpoint(endpoint_url)
        try:
            import s3fs
        except ImportError as exc:  # pragma: no cover - s3fs is a dependency
            raise StorageError(f"{redact(url)}: s3fs is not installed") from exc
        client_kwargs = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if region:
            client_kwargs["region_name"] = region
        # skip_instance_cache: a fresh client per Storage, so a changed
        # endpoint or environment is honoured; credentials come from the AWS chain.
        # Retries are gradyard's (with_retries, with backoff and a budget per
        # checkpoint); stacked retry loops in s3fs and botocore would multiply it.
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True,
                               config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"},
                                              "connect_timeout": 5, "read_timeout": 30})
        fs.retries = 1
        path = url.split("://", 1)[1].rstrip("/")
        return Storage(fs, path, url.rstrip("/"), endpoint, region)
    if protocol == "file":
        local = url[len("file://"):] if url.startswith("file://") else url
        local = os.path.abspath(os.path.expanduser(local))
        return Storage(fsspec.filesystem("file", auto_mkdir=True), local, url.rstrip("/") or url, None, None)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{redact(url)}: unsupported storage ({exc}); use a local path, file:// or s3://") from None
    return Storage(fs, path.rstrip("/"), url.rstrip("/"), None, None)


def storage_from_spec(d: dict) -> Storage:
    return open_storage(d["url"], d.get("endpoint_url"), d.get("region"))


def is_transient(exc: BaseException) -> bool:
    """Whether an exception from fsspec/s3fs/botocore looks like it may pass."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (PermissionError, FileNotFoundError)):
        return False
    text = f"{type(exc).__name__} {exc}"
    markers = ("500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable",
               "Connection", "connection", "Timeout", "timed out", "reset", "EndpointConnectionError",
               "IncompleteRead", "ServerDisconnected", "ClientPayloadError", "RemoteDisconnected",
               "ResponseStreamingError", "Throttl", "RequestTimeout")
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) or any(m in text for m in markers)


def check_storage(storage: Storage) -> None:
    """Fail fast, before any worker starts: endpoint reachable, bucket present, writable.

    Writes and removes a marker file, like Ray Train's storage validation.
    """
    where = redact(storage.url)
    if storage.endpoint_url:
        where += f" (endpoint {redact(storage.endpoint_url)})"
    marker = storage.join(f".gradyard-write-check-{uuid.uuid4().hex[:8]}")
    try:
        if not storage.is_local and "s3" in storage.fs.protocol:
            _head_bucket(storage, where)
        storage.fs.makedirs(storage.root_path, exist_ok=True)
        with storage.fs.open(marker, "wb") as f:
            f.write(b"gradyard")
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


def with_retries(fn, *, what: str, attempts: int = 6, base_delay: float = 0.25,
                 max_delay: float = 4.0, log=None):
    """Call ``fn`` until it succeeds, backing off exponentially on transient failures."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if attempt == attempts or not is_transient(exc):
                raise
            if log:
                log(f"{what}: attempt {attempt} failed ({redact(type(exc).__name__)}: "
                    f"{redact(str(exc))[:200]}); retrying in {delay:.2f}s")
            time.sleep(delay)
            delay = min(max_delay, delay * 2)
