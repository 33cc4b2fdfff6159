"""Which locations gradyard reads and writes, checked before anything is opened.

``storage.url``, ``data.source`` and ``model.pretrained`` take a local path,
``file://`` or ``s3://`` (AWS, or any S3-compatible endpoint through
``storage.endpoint_url``).  Anything else is refused at validation, by name:

* other schemes (``http(s)://``, ``ftp://``, ``gs://``...): gradyard reads
  nothing from the open internet, and other object stores are not tested here;
* credentials inside the URL (``s3://KEY:SECRET@bucket``): credentials come
  from the environment or the AWS chain, never from a job file, where they
  would be copied into logs, checkpoints and Ray's job metadata;
* an ``s3://`` URL without a bucket, or with a query string or fragment
  (a presigned URL is a secret, and S3 keys take neither).

No import here is heavier than the standard library: the schema uses it.
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import urlsplit

from gradyard.storage.redact import redact

ALLOWED = "a local path, file:// or s3://"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def scheme(url: str) -> str:
    """``s3``, ``file``, ... in lower case; ``""`` for a plain local path."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def is_remote(url: str) -> bool:
    return scheme(url) not in ("", "file")


def problem(url: str) -> Optional[str]:
    """Why ``url`` is not a location gradyard may use (None when it is).  Never echoes a secret."""
    if not isinstance(url, str) or not url.strip():
        return "must not be empty"
    if "\x00" in url or any(c in url for c in "\r\n"):
        return "must not contain NUL or line breaks"
    kind = scheme(url)
    if kind not in ("", "file", "s3", "s3a"):
        return f"unsupported scheme {kind + '://'!r}; allowed: {ALLOWED}"
    if kind in ("", "file"):
        return None
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return ("must not carry credentials (user:password@); give them through the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), an AWS profile or an instance role")
    if parts.query or parts.fragment:
        return (f"{redact(url)}: an s3:// URL takes no query string or fragment (a presigned URL is a "
                "secret; give the bucket and key, and credentials through the AWS chain)")
    if not _BUCKET.match(parts.netloc):
        return f"{redact(url)}: {parts.netloc!r} is not an S3 bucket name (3-63 lowercase letters, digits, '.', '-')"
    return None
