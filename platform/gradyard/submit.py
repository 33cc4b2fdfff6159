"""`gradyard submit | status | logs | list | stop`: Ray's job submission API with gradyard's checks.

``gradyard submit FILE --address http://HEAD:8265`` does what
``ray job submit --address ... --working-dir . -- python -m gradyard.launch FILE``
does, after validating FILE here (a bad file never reaches the cluster), and
behaves as ``ray job`` does: it waits and streams the job's logs unless
``--no-wait``; ``--address`` defaults to ``$RAY_ADDRESS``; ``--headers`` (or
``$RAY_JOB_HEADERS``) and ``--verify`` reach an authenticating proxy or a TLS
ingress.  The working directory is uploaded by Ray, which applies the
directory's ``.rayignore`` (shipped with gradyard) on both paths.

Token authentication: with ``RAY_AUTH_MODE=token``, Ray's client sends the
token from ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``; gradyard never prints it.
Every line from the cluster (status messages, logs) is redacted before it is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Union

from gradyard.job import load_job
from gradyard.storage import redact

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never shipped, whatever the working directory's .rayignore says (Ray uploads .git/ otherwise;
# runs/ is gradyard's default local storage, whose checkpoints would ride along).
EXCLUDES = [".git/", ".venv/", "runs/", "**/__pycache__/"]
PROGRESS = re.compile(r"\bstep (\d+)/(\d+)")


class SubmitError(Exception):
    pass


def parse_verify(text: str) -> Union[bool, str]:
    """``--verify``: true/false, or a CA bundle (file or directory), as ``ray job`` takes it."""
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    if not Path(text).exists():
        raise SubmitError(f"--verify {text}: neither true/false nor an existing CA bundle")
    return text


def parse_headers(text: Optional[str]) -> Optional[dict]:
    text = text if text is not None else os.environ.get("RAY_JOB_HEADERS")
    if text is None:
        return None
    try:
        headers = json.loads(text)
    except ValueError:
        headers = None
    if not isinstance(headers, dict):
        raise SubmitError('--headers (or RAY_JOB_HEADERS) must be a JSON object, e.g. '
                          '\'{"Authorization": "Bearer ..."}\'')
    return headers


def client(args: Any):
    """A JobSubmissionClient for ``args``' --address/$RAY_ADDRESS, --headers, --verify."""
    from ray.job_submission import JobSubmissionClient

    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    headers = parse_headers(getattr(args, "headers", None))
    verify = parse_verify(getattr(args, "verify", None) or "true")
    try:
        return JobSubmissionClient(address, headers=headers, verify=verify)
    except Exception as exc:  # noqa: BLE001 - connection and auth errors become one line
        raise SubmitError(f"cannot reach the Ray dashboard at {redact(address)}: "
                          f"{redact(str(exc)).splitlines()[0][:300]}") from None


def _call(fn, *a, what: str):
    """A Ray client call; its errors (an unknown job id, a lost connection) become one line."""
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001
        first = (redact(str(exc)).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SubmitError(f"{what}: {first}") from None


def entrypoint(job_path: str, overrides: list[str], storage: str | None, fresh: bool) -> str:
    parts = ["python", "-m", "gradyard.launch", job_path]
    for o in overrides:
        parts += ["--set", o]
    if storage:
        parts += ["--storage", storage]
    if fresh:
        parts.append("--fresh")
    return shlex.join(parts)


def submit(file: str, jobs, overrides: list[str], working_dir: str = ".", storage: str | None = None,
           fresh: bool = False, submission_id: str | None = None) -> str:
    """Validate ``file`` here, then submit it through ``jobs`` (a JobSubmissionClient); the job id."""
    spec = load_job(file, overrides)  # same error as `gradyard validate`
    wd = Path(working_dir).resolve()
    try:
        rel = Path(file).resolve().relative_to(wd)
    except ValueError:
        raise SubmitError(f"{file} is outside the working directory {wd}; the cluster only sees "
                          "files under --working-dir") from None
    run_dir = f"{(storage or spec.storage.url).rstrip('/')}/{spec.name}"
    return _call(lambda: jobs.submit_job(
        entrypoint=entrypoint(rel.as_posix(), overrides, storage, fresh),
        runtime_env={"working_dir": str(wd), "excludes": EXCLUDES},
        submission_id=submission_id,
        metadata={"gradyard_job": spec.name, "spec_hash": spec.spec_hash(), "run_dir": redact(run_dir)},
    ), what="the cluster refused the job")


def _status(status) -> str:
    return str(getattr(status, "value", status))


def stream(jobs, job_id: str, out=None) -> str:
    """Ray's log tail (a websocket, only new bytes), as whole redacted lines; the final status."""
    out = out or sys.stdout

    async def tail() -> None:
        pending = ""
        async for chunk in jobs.tail_job_logs(job_id):
            pending += chunk
            whole, _, pending = pending.rpartition("\n")
            if whole:
                out.write(redact(whole + "\n"))
                out.flush()
        if pending:
            out.write(redact(pending + "\n"))
            out.flush()

    _call(lambda: asyncio.run(tail()), what=f"lost the log stream of {job_id}")
    return wait_status(jobs, job_id)


def wait_status(jobs, job_id: str, poll: float = 0.5) -> str:
    import time

    while True:
        status = _status(_call(jobs.get_job_status, job_id, what=f"job {job_id}"))
        if status in TERMINAL:
            return status
        time.sleep(poll)


def exit_code(status: str) -> int:
    """The scheme of every command: 0 ok (or still running), 1 the job failed or was stopped."""
    return 1 if status in ("FAILED", "STOPPED") else 0


def error_from_logs(logs: str) -> str:
    lines = [ln for ln in logs.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln:
            return ln.strip()
    return lines[-1].strip() if lines else "no output"


def describe(jobs, job_id: str, with_progress: bool = False) -> dict:
    """What `status --json` and `list --json` print for one job."""
    info = _call(jobs.get_job_info, job_id, what=f"job {job_id}")
    return _row(jobs, info, with_progress)


def _row(jobs, info, with_progress: bool) -> dict:
    meta = info.metadata or {}
    row = {"submission_id": info.submission_id, "status": _status(info.status),
           "message": redact(info.message or ""), "gradyard_job": meta.get("gradyard_job"),
           "run_dir": meta.get("run_dir"), "start_time": info.start_time, "end_time": info.end_time}
    if with_progress:
        row["progress"] = None
        if row["status"] == "RUNNING":  # a finished job's progress is its summary's
            try:
                found = PROGRESS.findall(jobs.get_job_logs(info.submission_id)[-20000:])
            except Exception:  # noqa: BLE001 - progress is a courtesy of the listing
                found = []
            if found:
                step, total = found[-1]
                row["progress"] = {"step": int(step), "total": int(total)}
    return row


# ------------------------------------------------------------------ commands


def cmd_submit(args) -> int:
    load_job(args.file, args.overrides)  # a bad job file says so before any cluster is asked
    jobs = client(args)
    job_id = submit(args.file, jobs, args.overrides, args.working_dir, args.storage, args.fresh,
                    args.submission_id)
    if args.no_wait:
        print(json.dumps({"submission_id": job_id, "status": "PENDING"}) if args.json else job_id)
        return 0
    if not args.json:
        print(job_id, flush=True)
    if args.quiet or args.json:
        with open(os.devnull, "w") as sink:
            status = stream(jobs, job_id, out=sink)
    else:
        status = stream(jobs, job_id)
    if args.json:
        print(json.dumps(describe(jobs, job_id)))
    if status == "SUCCEEDED":
        return 0
    info = _call(jobs.get_job_info, job_id, what=f"job {job_id}")
    reason = error_from_logs(_call(jobs.get_job_logs, job_id, what=f"job {job_id}"))
    print(f"error: job {job_id} {status.lower()}: {redact(reason)}", file=sys.stderr)
    if info.message and "exit code" in info.message:
        print(f"  ({redact(info.message.strip().splitlines()[0][:200])})", file=sys.stderr)
    return exit_code(status)


def cmd_status(args) -> int:
    row = describe(client(args), args.job_id)
    if args.json:
        print(json.dumps(row))
    else:
        # Ray's message of a failed job holds its last 20 kB of logs: the first line here, all of it in --json.
        first = row["message"].strip().splitlines()[0][:200] if row["message"].strip() else ""
        print(f"{args.job_id}: {row['status']}" + (f" ({first})" if first else ""))
    return exit_code(row["status"])


def cmd_logs(args) -> int:
    jobs = client(args)
    if args.follow:
        return exit_code(stream(jobs, args.job_id))
    logs = redact(_call(jobs.get_job_logs, args.job_id, what=f"job {args.job_id}"))
    if args.json:
        print(json.dumps({"submission_id": args.job_id, "logs": logs}))
    else:
        sys.stdout.write(logs)
    return 0


def cmd_list(args) -> int:
    jobs = client(args)
    infos = _call(jobs.list_jobs, what="cannot list the cluster's jobs")
    rows = [_row(jobs, i, with_progress=True)
            for i in sorted(infos, key=lambda i: i.start_time or 0)
            if (i.metadata or {}).get("gradyard_job") and i.submission_id]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("SUBMISSION ID", "STATUS", "JOB", "RUN DIRECTORY", "PROGRESS")
    table = [head] + [(r["submission_id"], r["status"], r["gradyard_job"], r["run_dir"] or "-",
                       f"step {r['progress']['step']}/{r['progress']['total']}" if r.get("progress")
                       else "-") for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_stop(args) -> int:
    stopped = _call(client(args).stop_job, args.job_id, what=f"job {args.job_id}")
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def add_client_arguments(p) -> None:
    """--address, --headers, --verify: as `ray job` takes them."""
    p.add_argument("--address", help="Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--headers", metavar="JSON",
                   help='HTTP headers for every request, e.g. \'{"Authorization": "Bearer TOKEN"}\' '
                        "(default: $RAY_JOB_HEADERS)")
    p.add_argument("--verify", metavar="BOOL|CA_PATH",
                   help="verify the dashboard's TLS certificate: true (default), false, or a CA bundle")


def add_commands(cli_command) -> None:
    """The submission commands, made by the CLI's own command factory (help, example), plus the
    client arguments each of them takes."""
    def command(name: str, help: str, example: str):
        p = cli_command(name, help, example)
        add_client_arguments(p)
        return p

    s = command("submit", "submit a job to a Ray cluster, stream its logs and exit with its status",
                "gradyard submit jobs/mnist-lenet.yaml --address http://HEAD:8265 --storage s3://bucket/runs")
    s.add_argument("file", help="job definition (YAML), inside --working-dir")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key, e.g. --set schedule.epochs=3")
    s.add_argument("--working-dir", default=".", help="directory shipped to the cluster (default: .)")
    s.add_argument("--storage", metavar="URL", help="put the run directory at URL/<job name>")
    s.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    s.add_argument("--submission-id", help="the Ray job id to use (default: Ray picks one)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)  # the default now
    s.add_argument("--quiet", action="store_true", help="wait without streaming the logs")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object: submission_id, status, message, gradyard_job, run_dir, times")
    s.set_defaults(fn=cmd_submit)

    st = command("status", "a submitted job's status (exit 1 if it failed or was stopped)",
                 "gradyard status raysubmit_XYZ --address http://HEAD:8265 --json")
    st.add_argument("job_id", help="submission id, as `submit` and `list` print it")
    st.add_argument("--json", action="store_true", help="print one JSON object (the fields of `list --json`)")
    st.set_defaults(fn=cmd_status)

    lg = command("logs", "a submitted job's logs",
                 "gradyard logs raysubmit_XYZ -f --address http://HEAD:8265")
    lg.add_argument("job_id", help="submission id")
    lg.add_argument("--follow", "-f", action="store_true",
                    help="stream new lines until the job ends; exit with its status")
    lg.add_argument("--json", action="store_true", help='print {"submission_id": ..., "logs": ...}')
    lg.set_defaults(fn=cmd_logs)

    ls = command("list", "gradyard jobs on a cluster: status, run directory, progress",
                 "gradyard list --address http://HEAD:8265")
    ls.add_argument("--json", action="store_true",
                    help="print a JSON list: submission_id, status, message, gradyard_job, run_dir, "
                         "start_time, end_time, progress {step, total}")
    ls.set_defaults(fn=cmd_list)

    sp = command("stop", "stop a submitted job", "gradyard stop raysubmit_XYZ --address http://HEAD:8265")
    sp.add_argument("job_id", help="submission id")
    sp.set_defaults(fn=cmd_stop)

