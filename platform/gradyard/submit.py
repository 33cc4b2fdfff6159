"""`gradyard submit | status | logs | stop`: Ray's job submission API with gradyard's checks.

``gradyard submit FILE --address http://HEAD:8265`` does what
``ray job submit --address ... --working-dir . -- python -m gradyard.launch FILE``
does, after validating FILE here (a bad file never reaches the cluster).

Token authentication: with ``RAY_AUTH_MODE=token``, Ray's client sends the
token from ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``; gradyard never prints it.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from gradyard.job import load_job
from gradyard.storage import redact

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never shipped to the cluster with the working directory.
EXCLUDES = [".venv/", ".git/", "runs/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/", "bench/results/"]


class SubmitError(Exception):
    pass


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection and auth errors become one line
        raise SubmitError(f"cannot reach the Ray dashboard at {redact(address)}: "
                          f"{redact(str(exc)).splitlines()[0][:300]}") from None


def entrypoint(job_path: str, overrides: list[str], storage: str | None, fresh: bool) -> str:
    parts = ["python", "-m", "gradyard.launch", job_path]
    for o in overrides:
        parts += ["--set", o]
    if storage:
        parts += ["--storage", storage]
    if fresh:
        parts.append("--fresh")
    return shlex.join(parts)


def submit(file: str, address: str | None, overrides: list[str], working_dir: str = ".",
           storage: str | None = None, fresh: bool = False, submission_id: str | None = None) -> str:
    spec = load_job(file, overrides)  # same error as `gradyard validate`
    wd = Path(working_dir).resolve()
    try:
        rel = Path(file).resolve().relative_to(wd)
    except ValueError:
        raise SubmitError(f"{file} is outside the working directory {wd}; the cluster only sees "
                          "files under --working-dir") from None
    client = _client(address)
    return client.submit_job(
        entrypoint=entrypoint(rel.as_posix(), overrides, storage, fresh),
        runtime_env={"working_dir": str(wd), "excludes": EXCLUDES},
        submission_id=submission_id,
        metadata={"gradyard_job": spec.name, "spec_hash": spec.spec_hash()},
    )


def _status(status) -> str:
    return str(getattr(status, "value", status))


def wait(client, job_id: str, follow: bool = True, poll: float = 1.0) -> str:
    """Stream the logs while the job runs (whole lines, redacted); return its final status."""
    printed = 0
    while True:
        status = _status(client.get_job_status(job_id))
        if follow:
            logs = client.get_job_logs(job_id)
            end = len(logs) if status in TERMINAL else logs.rfind("\n", printed) + 1
            if end > printed:
                sys.stdout.write(redact(logs[printed:end]))
                sys.stdout.flush()
                printed = end
        if status in TERMINAL:
            return status
        time.sleep(poll)


def error_from_logs(logs: str) -> str:
    lines = [ln for ln in logs.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln:
            return ln.strip()
    return lines[-1].strip() if lines else "no output"


# ------------------------------------------------------------------ commands


def cmd_submit(args) -> int:
    job_id = submit(args.file, args.address, args.overrides, args.working_dir, args.storage,
                    args.fresh, args.submission_id)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    client = _client(args.address)
    status = wait(client, job_id, follow=not args.quiet)
    if status == "SUCCEEDED":
        return 0
    info = client.get_job_info(job_id)
    reason = error_from_logs(client.get_job_logs(job_id))
    print(f"error: job {job_id} {status.lower()}: {redact(reason)}", file=sys.stderr)
    if info.message and "exit code" in info.message:
        print(f"  ({redact(info.message.strip().splitlines()[0][:200])})", file=sys.stderr)
    return 1


def cmd_status(args) -> int:
    client = _client(args.address)
    info = client.get_job_info(args.job_id)
    status = _status(info.status)
    print(f"{args.job_id}: {status}" + (f" ({redact(info.message)})" if info.message else ""))
    return 0 if status != "FAILED" else 1


def cmd_logs(args) -> int:
    client = _client(args.address)
    if args.follow:
        status = wait(client, args.job_id, follow=True)
        return 0 if status == "SUCCEEDED" else 1
    sys.stdout.write(redact(client.get_job_logs(args.job_id)))
    return 0


def cmd_stop(args) -> int:
    client = _client(args.address)
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def add_commands(sub) -> None:
    def address(p):
        p.add_argument("--address", help="Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")

    s = sub.add_parser("submit", help="submit a job to a Ray cluster (ray job submit)")
    s.add_argument("file")
    address(s)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--working-dir", default=".", help="shipped to the cluster (default: .)")
    s.add_argument("--storage", help="put the run directory at URL/<job name>")
    s.add_argument("--fresh", action="store_true")
    s.add_argument("--submission-id", help="Ray job id to use")
    s.add_argument("--wait", action="store_true", help="follow the logs; exit 0 only if it succeeds")
    s.add_argument("--quiet", action="store_true", help="with --wait: do not stream the logs")
    s.set_defaults(fn=cmd_submit)

    st = sub.add_parser("status", help="a submitted job's status")
    st.add_argument("job_id")
    address(st)
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser("logs", help="a submitted job's logs")
    lg.add_argument("job_id")
    address(lg)
    lg.add_argument("--follow", "-f", action="store_true")
    lg.set_defaults(fn=cmd_logs)

    sp = sub.add_parser("stop", help="stop a submitted job")
    sp.add_argument("job_id")
    address(sp)
    sp.set_defaults(fn=cmd_stop)
