"""Untrusted input stays harmless: secrets never shown, data that climbs out of its folder never written.

A job file, a dataset and a URL come from users and from the places they point at.  These tests plant
distinctive secrets (in the environment, in an AWS credentials file, in URLs) and grep everything a run,
a resumed run, failed runs and a submitted job leave behind; and they serve datasets whose names climb
out of the staging folder.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from conftest import JOBS, TEST_ACCESS_KEY, TEST_SECRET_KEY, quiet_success, run_cli, wait_until
from gradyard.checkpoint import COMPLETE, list_checkpoints
from gradyard.storage import open_storage

pytestmark = pytest.mark.ray

PROFILE_KEY = "AKIAGYPROFILE" + uuid.uuid4().hex[:7].upper()
PROFILE_SECRET = "gy-profile-secret-" + uuid.uuid4().hex
URL_SECRET = "gy-url-secret-" + uuid.uuid4().hex


def _objects(s3, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    bucket, _, key = prefix[len("s3://"):].partition("/")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def test_no_secret_reaches_output_logs_metrics_summaries_or_checkpoints(ray_cluster, s3, tmp_path):
    """A run on S3, its resume as a submitted job (scraped while it trains), failed runs with credentials
    in their URLs, the job's status and logs: none shows the AWS keys, the profile's keys, the URL's
    password or the Ray token."""
    creds = tmp_path / "aws-credentials"
    creds.write_text(f"[default]\naws_access_key_id = {PROFILE_KEY}\naws_secret_access_key = {PROFILE_SECRET}\n")
    sd = Path(os.environ["GRADYARD_PROMETHEUS_SD_DIR"])  # where the session cluster's workers register
    env = {"AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_SHARED_CREDENTIALS_FILE": str(creds)}
    url = f"s3://gradyard-test/secrets-{int(time.time() * 1000)}"
    args = ["run", str(JOBS / "circles.yaml"), "--address", ray_cluster.address, "--storage", url,
            "--set", "checkpoint.every_steps=7"]
    first = run_cli(*args, "--set", "schedule.epochs=2", "--json", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)  # --json: stdout is the summary alone (its "error" field empty)
    assert summary["status"] == "succeeded" and not summary.get("error")
    quiet_success(first.stderr)  # everything else the run printed

    # The resumed run, scraped while it trains (its workers serve Prometheus metrics).
    scraped: list[str] = []

    def scrape():
        def targets():
            return [t for f in sd.glob("circles-*.json") for g in json.loads(f.read_text()) for t in g["targets"]]

        try:
            for target in wait_until(targets, timeout=120, interval=0.2, what="metrics targets"):
                scraped.append(urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read().decode())
        except Exception as exc:  # noqa: BLE001 - asserted below
            scraped.append(f"SCRAPE FAILED {exc!r}")


    # Failed runs: credentials in the URL are refused before anything starts, without being echoed.
    bad = [run_cli("run", str(JOBS / "circles.yaml"), "--storage", f"s3://AKIAX:{URL_SECRET}@gradyard-test/x",
                   env=env, timeout=120),
           run_cli("validate", str(JOBS / "circles.yaml"), "--set",
                   f"data.source=s3://gradyard-test/d?X-Amz-Signature={URL_SECRET}", "--set", "data.format=csv",
                   env=env, timeout=60),
           run_cli("submit", str(JOBS / "circles.yaml"), "--address", ray_cluster.dashboard, "--set",
                   f"storage.url=https://user:{URL_SECRET}@example.com/x", env=env, timeout=60)]
    for r in bad:
        assert r.returncode == 2, r.stdout + r.stderr
        assert "must not carry credentials" in r.stderr or "takes no query string" in r.stderr or \
            "unsupported scheme" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr

    # The same job submitted to the cluster resumes the run (same storage), scraped while it trains;
    # then its status and logs.
    t = threading.Thread(target=scrape, daemon=True)
    t.start()
    sub = run_cli("submit", "jobs/circles.yaml", "--address", ray_cluster.dashboard, "--storage", url,
                  "--set", "checkpoint.every_steps=7", "--set", "schedule.epochs=6",
                  "--set", f"storage.endpoint_url={s3.endpoint}", env=env, timeout=300)
    t.join(timeout=60)
    assert sub.returncode == 0, sub.stderr[-3000:]
    assert "resumed from checkpoint at step 26" in sub.stdout
    assert scraped and not scraped[0].startswith("SCRAPE FAILED") and "gradyard_steps_total" in scraped[0], scraped
    job_id = sub.stdout.strip().splitlines()[0]
    status = run_cli("status", job_id, "--address", ray_cluster.dashboard, timeout=60)
    logs = run_cli("logs", job_id, "--address", ray_cluster.dashboard, timeout=60)
    assert "SUCCEEDED" in status.stdout and "[circles] finished" in logs.stdout

    objects = _objects(s3, url)
    names = [k for k in objects if k.endswith(("state.pt", "manifest.json", "summary.json", "attempts.json"))]
    assert {n.rsplit("/", 1)[-1] for n in names} == {"state.pt", "manifest.json", "summary.json", "attempts.json"}
    summary = json.loads(objects[f"{url.split('/', 3)[3]}/circles/summary.json"])
    assert summary["steps"] == 78 and summary["restarts"] == 1
    assert summary["spec"]["storage"]["url"] == "./runs"  # the spec is stored, redacted
    assert [c.status for c in list_checkpoints(open_storage(url + "/circles", endpoint_url=s3.endpoint))][-1] == COMPLETE

    texts = {"first run": first.stdout + first.stderr, "metrics": "\n".join(scraped),
             "submitted, resumed run": sub.stdout + sub.stderr,
             "status": status.stdout + status.stderr, "logs": logs.stdout + logs.stderr}
    texts.update({f"failed run {i}": r.stdout + r.stderr for i, r in enumerate(bad)})
    texts.update({f"s3://{k}": blob.decode("latin-1") for k, blob in objects.items()})
    for log in Path(ray_cluster.temp_dir).rglob("*"):
        # Not the uploaded copies of the submitted working directory (these tests' own sources).
        if log.is_file() and log.stat().st_size < 50_000_000 and "working_dir_files" not in log.parts:
            texts[str(log)] = log.read_bytes().decode("latin-1")
    secrets = [TEST_SECRET_KEY, TEST_ACCESS_KEY, PROFILE_KEY, PROFILE_SECRET, URL_SECRET, os.environ["RAY_AUTH_TOKEN"]]
    leaks = [(where, s[:12]) for where, text in texts.items() for s in secrets if s in text]
    assert not leaks, leaks


# ------------------------------------------------------------------ staging


class _Index(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # an index page whose links climb four levels up
        _Index.requests.append(self.path)
        body = b'<a href="../../../../escaped.txt">x</a> <a href="train/a/0.png">y</a>'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_sources_are_refused_before_anything_is_fetched(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = f"http://127.0.0.1:{server.server_port}/food/"
        before = set(tmp_path.parent.rglob("escaped.txt"))
        validate = run_cli("validate", str(JOBS / "tinyvgg.yaml"), "--set", f"data.source={source}", timeout=60)
        run = run_cli("run", str(JOBS / "tinyvgg.yaml"), "--set", f"data.source={source}", "--storage",
                      str(tmp_path / "runs"), env={"HOME": str(tmp_path / "home")}, timeout=120)
        for r in (validate, run):
            assert r.returncode == 2, r.stdout + r.stderr
            assert "data.source: unsupported scheme 'http://'; allowed: a local path, file:// or s3://" in r.stderr
            assert "Traceback" not in r.stderr
        assert _Index.requests == [], "nothing may be fetched"
        assert set(tmp_path.parent.rglob("escaped.txt")) == before
        assert not (tmp_path / "home").exists() and not (tmp_path / "runs").exists()
    finally:
        server.shutdown()


@pytest.mark.parametrize("evil", ["food/train/a/../../../../escaped.txt", "food/train//b/x.png",
                                  "food/./train/b/y.png", "food/train/b\\..\\..\\z.png"])
def test_s3_keys_that_climb_out_of_the_dataset_write_nothing(s3, tmp_path, evil):
    from gradyard.data import DataError, build_datasets
    from gradyard.job import load_job

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    prefix = f"climb-{uuid.uuid4().hex[:8]}"
    from testkit.datafiles import make_imagefolder

    make_imagefolder(tmp_path / "src" / "food")
    for f in (tmp_path / "src").rglob("*.png"):
        client.put_object(Bucket="gradyard-test", Key=f"{prefix}/{f.relative_to(tmp_path / 'src')}",
                          Body=f.read_bytes())
    client.put_object(Bucket="gradyard-test", Key=f"{prefix}/{evil}", Body=b"evil")
    cache = tmp_path / "deep" / "down" / "cache"
    spec = load_job(JOBS / "tinyvgg.yaml", [f"data.source=s3://gradyard-test/{prefix}/food",
                                             f"data.cache_dir={cache}", f"storage.endpoint_url={s3.endpoint}"])
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(DataError) as err:
        build_datasets(spec)
    assert "object key" in str(err.value) and "is not a plain relative path" in str(err.value)
    assert evil.replace("\\", "\\\\")[:20] in str(err.value) or evil[:20] in str(err.value)
    written = {p for p in tmp_path.rglob("*")} - before
    # Only the cache folder (and its parents) and its lock file: not one staged file, nothing outside.
    assert all(str(p).startswith(str(cache)) or str(cache).startswith(str(p) + "/") for p in written), written
    assert not [p for p in written if p.is_file() and not p.name.endswith(".lock")], written
