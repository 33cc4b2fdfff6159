"""One retry policy for every storage call: tenacity, full jitter, a time budget, errors classified.

Decision: tenacity around gradyard's fsspec calls, with botocore's and s3fs's
own retry loops turned down to one attempt.  Stacked loops multiply (botocore's
standard mode retries 3 times inside each of s3fs's 5, inside each of ours),
so a dead endpoint would hold a checkpoint for minutes; one loop keeps the
budget where the caller sets it.  The wait is "full jitter" exponential
backoff (``wait_random_exponential``): ranks that hit throttling together do
not come back in lockstep.

What is retried is decided by what failed, never by the message text alone:

* HTTP status 5xx and 429, S3 error codes ``SlowDown``, ``Throttling*``,
  ``RequestTimeout``, ``InternalError``, ``ServiceUnavailable``;
* dropped or refused connections and timeouts (botocore's and aiohttp's
  connection errors, ``ConnectionError``, ``TimeoutError``, errno
  ``ECONNRESET``, ``ECONNREFUSED``, ``ETIMEDOUT``, ``EPIPE``, ``EAGAIN``...).

Never retried: a full disk or quota (``ENOSPC``, ``EDQUOT``), a read-only
filesystem (``EROFS``), permission and credential errors (``AccessDenied``,
``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``EACCES``), a missing bucket
or key, a failed precondition (an exclusive create that lost), and programming
errors.  They fail at once, with their own message.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import tenacity

from gradyard.storage.redact import redact

log = logging.getLogger("gradyard.storage")
T = TypeVar("T")


class TransientStorageError(OSError):
    """A failure that may pass (raised by gradyard's own code for conditions it knows are temporary)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    """At most this many tries in all."""
    budget_s: float = 30.0
    """No new try starts after this many seconds since the first."""
    initial_s: float = 0.2
    """Scale of the first wait; waits are random in [0, min(max_s, initial_s * 2**n)]."""
    max_s: float = 5.0


DEFAULT = RetryPolicy()
"""Reads and writes of records, checkpoints and data: about 30 s of trying."""
PATIENT = RetryPolicy(attempts=40, budget_s=180.0, max_s=10.0)
"""The final checkpoint and resume reads: worth minutes of an outage."""

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
                    "RequestThrottled", "RequestTimeout", "RequestTimeoutException", "InternalError",
                    "ServiceUnavailable", "Busy", "PriorRequestNotComplete", "RequestLimitExceeded",
                    "BandwidthLimitExceeded", "EC2ThrottledException", "OperationAborted"}
_PERMANENT_CODES = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "NoSuchBucket", "NoSuchKey", "NoSuchUpload", "PreconditionFailed", "InvalidBucketName",
                    "ExpiredToken", "InvalidToken", "AccountProblem", "InvalidRequest",
                    "EntityTooLarge", "MethodNotAllowed", "NotImplemented"}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EPIPE, errno.EAGAIN, errno.EINTR, errno.EHOSTUNREACH, errno.ENETUNREACH,
                     errno.ENETDOWN, errno.ENETRESET, errno.EBUSY}
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                     errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL,
                     errno.EFBIG, errno.ENOTEMPTY}
_TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
                    "ServerDisconnectedError", "ClientConnectionError", "ClientConnectorError",
                    "ClientOSError", "ClientPayloadError", "ServerTimeoutError", "RemoteDisconnected",
                    "ProtocolError", "IncompleteRead", "HTTPClientError"}


def _chain(exc: BaseException):
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _verdict(e: BaseException) -> Optional[bool]:
    """True: transient, False: permanent, None: this link of the chain does not say."""
    if isinstance(e, TransientStorageError):
        return True
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        err = response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int((response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return True
        if code in _PERMANENT_CODES or 400 <= status < 500:
            return False
    if type(e).__name__ in _TRANSIENT_TYPES:
        return True
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                      NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno in _TRANSIENT_ERRNOS:
            return True
        if e.errno in _PERMANENT_ERRNOS:
            return False
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may pass: the first link of its cause chain that says decides."""
    for e in _chain(exc):
        verdict = _verdict(e)
        if verdict is not None:
            return verdict
    return False


def call(fn: Callable[[], T], *, what: str, policy: RetryPolicy = DEFAULT,
         sleep: Callable[[float], None] = tenacity.nap.sleep) -> T:
    """``fn()``, retried on transient failures under ``policy``; the last failure is raised as is."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s: attempt %d failed (%s: %s); retrying in %.2fs", what, state.attempt_number,
                    type(exc).__name__, redact(str(exc)).splitlines()[0][:200] if str(exc) else "",
                    state.next_action.sleep if state.next_action else 0.0)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_after_delay(policy.budget_s),
        wait=tenacity.wait_random_exponential(multiplier=policy.initial_s, max=policy.max_s),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep, sleep=sleep, reraise=True)
    return retrying(fn)
