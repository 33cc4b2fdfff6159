"""Large objects in parts: multipart uploads and ranged reads, several parts in flight, one retry policy.

Transport decision: s3fs (aiobotocore), the client the rest of the seam uses, with its multipart
upload tuned: parts of :data:`PART_SIZE`, :data:`CONCURRENCY` in flight per object, several objects
at once.  Measured against obstore (Rust's object_store) and s3torchconnector (the AWS CRT) on the
same endpoint, in the same rounds (docs/benchmarks.md, "Checkpoint transports", has the figures and
the command): the tuned s3fs upload is faster than a plain s3fs ``put`` of the same bytes, while
obstore and the CRT are faster still and cost the client about a third of the CPU.  s3fs stays
because it keeps one transport behind the seam: one endpoint resolution, one credential chain (the
AWS one, profiles included), one classification of errors for the retry policy
(:mod:`gradyard.storage.retry` knows botocore's errors; obstore and the CRT raise their own, and
run their own retry loops that would stack on ours), and the conditional PUT the manifest's commit
relies on.  obstore is the candidate if the writer's client CPU becomes the cost that matters.

Why these numbers: part sizes of 8 MiB cost more per byte in request overhead, 32 MiB parts leave
too few in flight for a checkpoint file of a few hundred MB; more than 8 parts in flight per
object gained nothing measurable (docs/benchmarks.md).  S3 needs parts of at least 5 MiB.

Reads: :func:`read_hashed` fetches an object of known size (a manifest says it) as ranged GETs, up
to :data:`CONCURRENCY` in flight, and hashes each part, in order, as it arrives: the bytes returned
are the bytes hashed, each read once.  Each part is retried on its own, so a dropped connection
costs one part again, not the object.
"""

from __future__ import annotations

import hashlib
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from gradyard.storage import retry

if TYPE_CHECKING:
    from gradyard.storage.core import Storage

PART_SIZE = 16 * 2**20
"""Bytes per part of a multipart upload and per ranged GET."""
CONCURRENCY = 8
"""Parts in flight per object."""


@dataclass(frozen=True)
class Transfer:
    """How a :class:`~gradyard.storage.Storage` moves large objects (tests make parts small)."""

    part_size: int = PART_SIZE
    """Bytes per part; objects under twice this are one PUT (s3fs's rule) or one GET."""
    concurrency: int = CONCURRENCY
    """Parts in flight per object."""


class SizeMismatch(Exception):
    """The object does not have the size its reader expected (``actual`` says what it has)."""

    def __init__(self, path: str, expected: int, actual: int):
        super().__init__(f"{path} has {actual} bytes, not {expected}")
        self.expected, self.actual = expected, actual


def upload(storage: "Storage", path: str, data: bytes, policy: retry.RetryPolicy = retry.DEFAULT,
           what: str = "") -> None:
    """Write ``data`` at ``path`` whole: one PUT, or a multipart upload of concurrent parts.

    S3 makes either visible only once complete; a failed multipart upload is aborted before the
    retry starts it again.
    """
    t = storage.transfer
    retry.call(lambda: storage.fs.pipe_file(path, data, chunksize=t.part_size, max_concurrency=t.concurrency),
               what=what or f"write {storage._shown_path(path)}", policy=policy)


class PartUpload:
    """A write-only stream to one object on S3: each full part goes up while the rest is written.

    The object appears whole at :meth:`close` or never: under ``2 * part_size`` bytes it is one
    PUT at close; from there on a multipart upload whose parts (``part_size`` bytes, the last up
    to twice that) upload as they fill, at most ``concurrency`` at once (``write`` waits for a free
    slot, so memory holds a bounded number of parts, never the whole object).  Each request is
    retried on its own under ``policy``; a failure aborts the multipart upload.
    """

    def __init__(self, storage: "Storage", path: str, policy: retry.RetryPolicy = retry.DEFAULT):
        self.storage, self.path, self.policy = storage, path, policy
        self.size = 0
        t = storage.transfer
        self._part, self._buf = t.part_size, bytearray()
        self._slots = threading.BoundedSemaphore(t.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=t.concurrency, thread_name_prefix="gradyard-upload")
        self._parts: list[Future] = []
        self._upload_id: Optional[str] = None
        self._bucket, _, self._key = path.partition("/")
        self._shown = storage._shown_path(path)

    def _s3(self, method: str, what: str, **kwargs):
        from fsspec.asyn import sync

        fs = self.storage.fs
        return retry.call(lambda: sync(fs.loop, fs._call_s3, method, Bucket=self._bucket, Key=self._key, **kwargs),
                          what=f"{what} {self._shown}", policy=self.policy)

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._buf += data
        self.size += n
        while len(self._buf) >= 2 * self._part:
            self._send(bytes(self._buf[:self._part]))
            del self._buf[:self._part]
        return n

    def _send(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._s3("create_multipart_upload", "start the upload of")["UploadId"]
        number = len(self._parts) + 1
        for fut in self._parts:  # fail early: a part that failed for good ends the upload now
            if fut.done() and fut.exception() is not None:
                raise fut.exception()
        self._slots.acquire()

        def put() -> dict:
            try:
                out = self._s3("upload_part", f"upload part {number} of", UploadId=self._upload_id,
                               PartNumber=number, Body=body)
                return {"PartNumber": number, "ETag": out["ETag"]}
            finally:
                self._slots.release()

        self._parts.append(self._pool.submit(put))

    def close(self) -> None:
        """Send what is left and make the object visible (waits for every part)."""
        try:
            if self._upload_id is None:
                data = bytes(self._buf)
                retry.call(lambda: self.storage.fs.pipe_file(self.path, data), what=f"write {self._shown}",
                           policy=self.policy)
            else:
                if self._buf:
                    self._send(bytes(self._buf))
                parts = [fut.result() for fut in self._parts]
                self._s3("complete_multipart_upload", "complete the upload of", UploadId=self._upload_id,
                         MultipartUpload={"Parts": parts})
                self._upload_id = None  # complete: nothing left to abort
            self._buf = bytearray()
        except BaseException:
            self.abort()
            raise
        finally:
            self._pool.shutdown(wait=True)
        self.storage.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        """Give up: no object appears, and S3 drops the parts sent (best effort)."""
        for fut in self._parts:
            fut.cancel()
        self._pool.shutdown(wait=True)
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._s3("abort_multipart_upload", "abort the upload of", UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the bucket's lifecycle rule clears what is left
                pass


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def read_hashed(storage: "Storage", path: str, size: int,
                policy: retry.RetryPolicy = retry.DEFAULT) -> tuple[bytes, str]:
    """(the object at ``path``, its sha256) for an object expected to hold ``size`` bytes.

    FileNotFoundError when there is none; :class:`SizeMismatch` when it holds another number of
    bytes (nothing more of it is read then).
    """
    shown = storage._shown_path(path)
    h = hashlib.sha256()
    part = storage.transfer.part_size
    if storage.is_local:
        def read_local() -> bytes:
            chunks = []
            with open(path, "rb") as f:
                while chunk := f.read(part):
                    h.update(chunk)  # while the chunk is in cache, not in a second pass
                    chunks.append(chunk)
            return b"".join(chunks)

        data = retry.call(read_local, what=f"read {shown}", policy=policy)
        if len(data) != size:
            raise SizeMismatch(shown, size, len(data))
        return data, h.hexdigest()

    from fsspec.asyn import sync

    fs = storage.fs
    bucket, _, key = path.partition("/")

    async def fetch(first: int, last: int) -> tuple[bytes, int]:
        kwargs = {"Range": f"bytes={first}-{last}"} if size else {}
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kwargs)
        async with resp["Body"] as body:
            blob = await body.read()
        m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
        total = int(m.group(3)) if m and m.group(3) != "*" else len(blob)
        return blob, total

    def get(first: int, last: int) -> tuple[bytes, int]:
        return retry.call(lambda: sync(fs.loop, fetch, first, last),
                          what=f"read {shown} (bytes {first}-{last})", policy=policy)

    ranges = [(a, min(a + part, size) - 1) for a in range(0, size, part)] or [(0, -1)]
    chunks: list[bytes] = []
    with ThreadPoolExecutor(max_workers=min(storage.transfer.concurrency, len(ranges)),
                            thread_name_prefix="gradyard-read") as pool:
        futures: list[Future] = [pool.submit(get, a, b) for a, b in ranges]
        try:
            for (first, last), fut in zip(ranges, futures):
                try:
                    blob, total = fut.result()
                except Exception as exc:  # noqa: BLE001 - a range past a shorter object's end: its size
                    if first > 0 and _unsatisfiable(exc):
                        raise SizeMismatch(shown, size, first) from None  # at most ``first`` bytes
                    raise
                if total != size or len(blob) != last - first + 1:
                    raise SizeMismatch(shown, size, total)
                h.update(blob)  # in order, as the parts arrive; later parts are still in flight
                chunks.append(blob)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return b"".join(chunks), h.hexdigest()


def _unsatisfiable(exc: BaseException) -> bool:
    """HTTP 416 (InvalidRange): the range starts past the object's end."""
    for e in retry._chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            err = response.get("Error", {}) or {}
            status = int((response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
            if status == 416 or err.get("Code") == "InvalidRange":
                return True
        if "InvalidRange" in str(e):
            return True
    return False
