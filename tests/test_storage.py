"""The storage seam on its own: redaction, which locations are allowed, retry classification, atomic writes."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from gradyard.runner import root_cause
from gradyard.storage import (
    RecordError, RetryPolicy, TransientStorageError, is_transient, open_storage, redact, register_secret,
)
from gradyard.storage import retry
from gradyard.storage.urls import problem

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ redaction


@pytest.mark.parametrize("text, secret", [
    ("s3://AKIAX:wJalr/XUt+nFEMI@bucket/key", "wJalr/XUt+nFEMI"),          # '/' and '+' in the password
    ("S3://user:p@ss@word@bucket/key", "p@ss@word"),                        # '@' in it, scheme upper case
    ("HTTPS://token123abc@github.com/org/repo", "token123abc"),             # a bare token
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAQ%2F20260101&X-Amz-Signature=deadbeef99",
     "deadbeef99"),                                                           # a presigned URL
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAQSECRETCRED&X-Amz-Date=1", "AKIAQSECRETCRED"),
    ("https://acct.blob.core.windows.net/c/b?sv=2020&sig=AbCdEf%2Bsecret", "AbCdEf%2Bsecret"),  # Azure SAS
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "eyJhbGciOiJIUzI1NiJ9.payload"),
    ("{'Authorization': 'AWS4-HMAC-SHA256 Credential=AKIA/xyz, Signature=abc'}", "Credential=AKIA/xyz"),
])
def test_redact_masks_credentials_in_every_form(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out


def test_redact_masks_known_secret_values_verbatim_and_url_encoded(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk/with+chars=")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-0123456789")
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIAFROMFILE0001\naws_secret_access_key = from/file+secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    register_secret("registered-secret-value")
    text = ("env sk/with+chars= encoded sk%2Fwith%2Bchars%3D plus sk%2Fwith%2Bchars%3D token "
            "ray-token-0123456789 file from/file+secret from%2Ffile%2Bsecret id AKIAFROMFILE0001 "
            "and registered-secret-value")
    out = redact(text)
    for s in ("sk/with+chars=", "sk%2Fwith%2Bchars%3D", "ray-token-0123456789", "from/file+secret",
              "from%2Ffile%2Bsecret", "AKIAFROMFILE0001", "registered-secret-value"):
        assert s not in out, s


def test_redact_leaves_ordinary_text_alone():
    text = "s3://bucket/path@v2/file and https://example.com/x?page=2 at step 7"
    assert redact(text) == text


# ------------------------------------------------------------------ locations


@pytest.mark.parametrize("url, allowed", [
    ("./runs", True), ("/data/mnist", True), ("file:///data/x", True), ("s3://my-bucket/prefix", True),
    ("s3a://my-bucket/p", True),
    ("http://example.com/data", False), ("HTTPS://example.com/data", False), ("ftp://h/x", False),
    ("gs://bucket/x", False), ("s3://KEY:SECRET@bucket/x", False), ("s3://bucket/x?versionId=1", False),
    ("s3://Bad_Bucket/x", False), ("", False), ("s3://b\nx", False),
])
def test_which_locations_are_allowed(url, allowed):
    assert (problem(url) is None) is allowed, problem(url)


def test_open_storage_refuses_what_validation_refuses():
    from gradyard.storage import StorageError

    with pytest.raises(StorageError, match="unsupported scheme 'http://'"):
        open_storage("http://example.com/runs")


# ------------------------------------------------------------------ retries


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _wrapped(cause: BaseException) -> OSError:
    """As s3fs raises them: an OSError whose cause is botocore's error."""
    exc = OSError(errno.EIO, str(cause))
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exc, transient", [
    (_wrapped(_client_error("SlowDown", 503)), True),
    (_wrapped(_client_error("InternalError", 500)), True),
    (_wrapped(_client_error("Throttling", 400)), True),
    (_wrapped(_client_error("RequestTimeout", 400)), True),
    (_wrapped(_client_error("Whatever", 502)), True),
    (_wrapped(_client_error("TooMany", 429)), True),
    (_wrapped(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (TimeoutError(), True),
    (TransientStorageError("x"), True),
    (_wrapped(_client_error("AccessDenied", 403)), False),
    (_wrapped(_client_error("NoSuchBucket", 404)), False),
    (_wrapped(_client_error("InvalidAccessKeyId", 403)), False),
    (_wrapped(_client_error("PreconditionFailed", 412)), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (OSError(errno.EROFS, "Read-only file system"), False),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
    (PermissionError(errno.EACCES, "denied"), False),
    (FileNotFoundError("gone"), False),
    (ValueError("a bug"), False),
    (OSError("Connection reset by peer"), False),  # words alone decide nothing
])
def test_what_is_retried_is_decided_by_what_failed(exc, transient):
    assert is_transient(exc) is transient


def test_retries_are_jittered_and_budgeted_and_permanent_errors_fail_at_once():
    waits_by_rank: list[list[float]] = []
    for rank in range(4):  # four ranks throttled at once
        waits: list[float] = []
        calls = {"n": 0}

        def throttled():
            calls["n"] += 1
            if calls["n"] < 6:
                raise _wrapped(_client_error("SlowDown", 503))
            return "ok"

        assert retry.call(throttled, what="put", policy=RetryPolicy(attempts=8, budget_s=60, initial_s=0.5,
                                                                   max_s=8), sleep=waits.append) == "ok"
        waits_by_rank.append(waits)
    assert all(len(w) == 5 for w in waits_by_rank)
    assert len({tuple(w) for w in waits_by_rank}) == 4, "ranks would retry in lockstep"
    assert all(0 <= x <= 8 for w in waits_by_rank for x in w)

    calls = {"n": 0}

    def full_disk():
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        retry.call(full_disk, what="write", sleep=lambda s: None)
    assert calls["n"] == 1

    calls["n"] = 0

    def always_503():
        calls["n"] += 1
        raise _wrapped(_client_error("SlowDown", 503))

    with pytest.raises(OSError):
        retry.call(always_503, what="put", policy=RetryPolicy(attempts=5), sleep=lambda s: None)
    assert calls["n"] == 5


# ------------------------------------------------------------------ atomic local writes


def test_json_records_are_written_atomically_and_torn_ones_say_so(tmp_path):
    st = open_storage(str(tmp_path))
    path = st.join("rec.json")
    st.write_json(path, {"a": 1})
    assert st.read_json(path) == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "rec.json").write_text('{"a": ')  # torn by a crash or a full disk
    with pytest.raises(RecordError, match=r"rec.json is not readable JSON \(6 bytes"):
        st.read_json(path)
    assert st.read_json(st.join("missing.json")) is None


def test_create_exclusive_has_one_winner(tmp_path):
    st = open_storage(str(tmp_path))
    path = st.join("lease.json")
    wins = []
    threads = [threading.Thread(target=lambda i=i: wins.append((i, st.create_exclusive(path, str(i).encode()))))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in wins if won]
    assert len(winners) == 1
    assert (tmp_path / "lease.json").read_text() == str(winners[0])


def test_remote_paths_do_not_depend_on_the_working_directory(tmp_path):
    """A Ray job's working directory can vanish under the driver; S3 paths must not care."""
    st = open_storage("s3://bucket/runs/job")
    gone = tmp_path / "gone"
    gone.mkdir()
    here = os.getcwd()
    os.chdir(gone)
    try:
        gone.rmdir()
        assert st._shown_path("bucket/runs/job/lease.json") == "s3://bucket/runs/job/lease.json"
        assert st._shown_path("bucket/runs/job") == "s3://bucket/runs/job"
    finally:
        os.chdir(here)


# ------------------------------------------------------------------ the runner's error mapping


def test_root_cause_is_the_innermost_error_line_redacted():
    inner = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                         "ValueError: data.source: nothing at s3://KEY:SECRET@bucket/x")
    outer = RuntimeError("TrainingFailedError: worker group failed")
    outer.__cause__ = inner
    cause = root_cause(outer)
    assert cause.startswith("ValueError: data.source: nothing at s3://***@bucket/x")
    assert "SECRET" not in cause
    assert root_cause(RuntimeError("")) == "RuntimeError"


# ------------------------------------------------------------------ four real ranks, a throttling S3


_RANK = r"""
import logging, sys
from gradyard.storage import open_storage
logging.basicConfig(level=logging.WARNING, format="%(message)s")
st = open_storage(sys.argv[1], endpoint_url=sys.argv[2])
st.write_json(st.join(f"rank-{sys.argv[3]}.json"), {"rank": int(sys.argv[3])})
print("wrote", flush=True)
"""


@pytest.mark.integration
def test_four_ranks_throttled_by_s3_retry_apart_and_a_denied_write_is_never_retried(s3):
    """Four processes writing through a proxy that throttles each one's first three PUTs with 503
    SlowDown: every one gets its write through, their waits differ (full jitter: no lockstep), and
    an AccessDenied is final: one request, no retry."""
    import re
    import subprocess
    import sys
    import uuid

    from testkit import FaultProxy

    url = f"s3://gradyard-test/throttle-{uuid.uuid4().hex[:8]}"
    with FaultProxy(s3.endpoint) as proxy:
        proxy.throttle_first = 3
        procs = [subprocess.Popen([sys.executable, "-c", _RANK, url, proxy.endpoint, str(r)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 and "wrote" in o for p, (o, _) in zip(procs, outs)), outs
        waits = [tuple(float(w) for w in re.findall(r"retrying in ([0-9.]+)s", e)) for _, e in outs]
        assert [len(w) for w in waits] == [3, 3, 3, 3], outs
        assert len(set(waits)) == 4, f"ranks waited alike: {waits}"
        # One request per attempt: no retry loop of botocore's or s3fs's stacked inside gradyard's.
        assert proxy.failed == 12 and proxy._writes_seen and set(proxy._writes_seen.values()) == {4}

        proxy.throttle_first, proxy.deny_writes = 0, True
        before = proxy.requests
        denied = subprocess.run([sys.executable, "-c", _RANK, url, proxy.endpoint, "9"], capture_output=True,
                                text=True, timeout=120)
        assert denied.returncode != 0 and "retrying in" not in denied.stderr
        assert "AccessDenied" in denied.stderr or "Access Denied" in denied.stderr or \
            "PermissionError" in denied.stderr, denied.stderr[-2000:]
        puts = proxy.requests - before
    assert puts == 1, f"{puts} requests for one denied write"
    st = open_storage(url, endpoint_url=s3.endpoint)
    assert sorted(st.read_json(st.join(f"rank-{r}.json"))["rank"] for r in range(4)) == [0, 1, 2, 3]
