"""Secrets never shown: the one function every message, log line and stored spec passes through.

What counts as a secret:

* credentials inside a URL (``scheme://user:password@host``, any scheme, any
  case, a password that itself holds ``@`` or ``/``);
* presigned-URL query parameters (``X-Amz-Signature``, ``X-Amz-Credential``,
  ``X-Amz-Security-Token``, ``Signature``, ``AWSAccessKeyId``, Azure's
  ``sig``, GCS's ``X-Goog-Signature``...);
* ``Authorization`` headers and bearer tokens;
* the values of the credential variables of this process (AWS keys, the Ray
  token) and of the AWS shared credentials file, verbatim and URL-encoded.

Validation refuses URLs with credentials in them (``gradyard.storage.urls``);
this is the second line: whatever slips into a message is masked on the way out.
"""

from __future__ import annotations

import configparser
import os
import re
import threading
from pathlib import Path
from typing import Iterable
from urllib.parse import quote, quote_plus

MASK = "***"

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
              "RAY_AUTH_TOKEN")
"""Environment variables whose values are never shown."""

_CREDENTIAL_KEYS = ("aws_secret_access_key", "aws_session_token", "aws_security_token", "aws_access_key_id")

# scheme://userinfo@ : a userinfo with a colon may hold '/' and '@' (up to the last '@' of
# the token); one without a colon is a bare token (https://TOKEN@host).
_USERINFO = re.compile(
    r"(?i)\b([a-z][a-z0-9+.\-]*://)(?:[^\s/?#@'\"<>]*:[^\s'\"<>]*@|[^\s/?#:@'\"<>]+@)")
_QUERY = re.compile(
    r"(?i)([?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid|"
    r"sig|x-goog-signature|x-goog-credential|access_token|token|password|secret)=)[^&#\s'\"<>]+")
_AUTH_HEADER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:(?:bearer|basic|aws4-hmac-sha256)\s+)?"
                          r"[^\s'\",}]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}")

_extra: set[str] = set()
_lock = threading.Lock()
_file_cache: dict[str, tuple[float, frozenset[str]]] = {}


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it appears from now on (e.g. a token read from a file)."""
    if value and len(value) >= 4:
        with _lock:
            _extra.add(value)


def _credential_files() -> Iterable[Path]:
    home = Path(os.path.expanduser("~"))
    yield Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    yield Path(os.environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
    yield home / ".ray" / "auth_token"


def _file_secrets(path: Path) -> frozenset[str]:
    """Secrets in an AWS shared credentials/config file (or a token file), cached by mtime."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return frozenset()
    cached = _file_cache.get(str(path))
    if cached and cached[0] == mtime:
        return cached[1]
    found: set[str] = set()
    try:
        text = path.read_text(errors="replace")
        if path.name == "auth_token":
            found.add(text.strip())
        else:
            parser = configparser.ConfigParser(interpolation=None, strict=False)
            parser.read_string(text)
            for section in parser.sections():
                for key in _CREDENTIAL_KEYS:
                    if parser.has_option(section, key):
                        found.add(parser.get(section, key).strip())
    except (OSError, configparser.Error, UnicodeError):
        pass
    secrets = frozenset(s for s in found if len(s) >= 4)
    _file_cache[str(path)] = (mtime, secrets)
    return secrets


def known_secrets() -> set[str]:
    """Every secret value this process knows of (environment, AWS files, registered ones)."""
    out = {os.environ[v] for v in SECRET_ENV if len(os.environ.get(v, "")) >= 4}
    for path in _credential_files():
        out |= _file_secrets(path)
    with _lock:
        out |= _extra
    return out


def redact(text: object) -> str:
    """``text`` with credentials in URLs, presigned parameters, auth headers and known secrets masked."""
    s = str(text)
    s = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", s)
    s = _QUERY.sub(lambda m: m.group(1) + MASK, s)
    s = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, s)
    s = _BEARER.sub(lambda m: m.group(1) + MASK, s)
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted(known_secrets(), key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            if form in s:
                s = s.replace(form, MASK)
    return s


def redact_tree(obj):
    """A copy of a JSON-like tree with every string redacted (specs stored in summaries and checkpoints)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return obj
