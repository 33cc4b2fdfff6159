"""gradyard: train the documented PyTorch jobs as DDP on Ray, with checkpoints and GPU-efficiency telemetry.

Validate a job, run it here (an embedded Ray cluster), or submit it to a cluster; then read its
checkpoints, export its model and ask what bounds it.  `gradyard COMMAND --help` shows each
command's arguments and an example.  Errors are one clear line, never a traceback.

exit status (every command):
  0  ok (for `status`, also: the job is still running)
  1  the job or training failed (or was stopped)
  2  bad usage, a bad job file, or missing or unusable input (a dataset, storage, an unknown job
     id, a cluster that cannot be reached, a run directory in use by another driver)
"""

# Over 350 lines because it is every command's arguments and help, one place for the CLI's shape;
# the commands' work lives in their own modules.  (Not in the docstring: that is `gradyard --help`.)

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from gradyard import __version__
from gradyard.job import JobError, load_job
from gradyard.storage import StorageError, redact
from gradyard.submit import SubmitError
from gradyard.submit import add_commands as add_submit_commands

JOBS_DIR_ENV = "GRADYARD_JOBS_DIR"


class CLIError(Exception):
    pass


def _jobs_dir() -> Path:
    if os.environ.get(JOBS_DIR_ENV):
        return Path(os.environ[JOBS_DIR_ENV])
    here = Path.cwd() / "jobs"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "jobs"


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def cmd_validate(args) -> int:
    results = []
    for f in args.files:
        try:
            spec = load_job(f, args.overrides)
            results.append({"file": f, "ok": True, "name": spec.name, "model": spec.model.arch,
                            "data": redact(spec.data.source)})
            if not args.json:
                print(f"{f}: ok ({spec.name}: {spec.model.arch} on {redact(spec.data.source)})")
        except JobError as exc:
            results.append({"file": f, "ok": False, "error": redact(str(exc))})
            if not args.json:
                print(redact(str(exc)), file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_USAGE


def cmd_jobs(args) -> int:
    from gradyard.data import build_datasets
    from gradyard.models import build_model, count_parameters

    files = sorted(_jobs_dir().glob("*.yaml"))
    if not files:
        raise CLIError(f"no job definitions in {_jobs_dir()}")
    rows = []
    for f in files:
        try:
            spec = load_job(f, ["data.source=synthetic"] if args.synthetic_shapes else [])
        except JobError as exc:
            rows.append((f.name, "INVALID", str(exc).splitlines()[-1].strip(), "", ""))
            continue
        params = "?"
        try:
            # Parameter counts need only shapes: build on synthetic data of the real shape.
            data = spec.data
            if data.is_url:  # real data may be absent here: synthetic data of its shape
                data = data.model_copy(update={"source": "synthetic", "num_samples": 16})
            probe = spec.model_copy(update={
                "data": data, "model": spec.model.model_copy(update={"pretrained": None})})
            _, _, info = build_datasets(probe)
            total, trainable = count_parameters(build_model(probe, info))
            params = f"{total:,}" if total == trainable else f"{total:,} ({trainable:,} trainable)"
        except Exception as exc:  # noqa: BLE001 - a listing should not die on one job
            params = f"? ({type(exc).__name__})"
        rows.append((f.name, spec.name, spec.model.arch, spec.data.source, params))
    if args.json:
        print(json.dumps([dict(zip(("file", "name", "model", "data", "parameters"), r)) for r in rows],
                         indent=2))
        return 0
    head = ("FILE", "NAME", "MODEL", "DATA", "PARAMETERS")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_run(args, on_cluster: bool = False) -> int:
    from gradyard.runner import run_job

    spec = load_job(args.file, args.overrides)
    address = getattr(args, "address", None) or (None if on_cluster else ray_address_from_env())
    as_json = getattr(args, "json", False)
    # With --json stdout is the summary alone: the run's own lines (and Ray's forwarded ones) go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = run_job(spec, address=address, storage_url=args.storage, fresh=args.fresh,
                          on_cluster=on_cluster)
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        print_summary(summary)
    return EXIT_OK


def ray_address_from_env() -> str | None:
    """``$RAY_ADDRESS`` as ``ray.init()`` takes it (a GCS address, ``auto``, ``ray://``), or None.

    A dashboard URL there is meant for job submission (``ray job``, ``gradyard submit``): a
    driver cannot attach to it, so `gradyard run` says so and trains on an embedded cluster.
    """
    value = os.environ.get("RAY_ADDRESS", "").strip()
    if not value or value == "local":  # "local": a new cluster in this process, as ray.init reads it
        return None
    if value.lower().startswith(("http://", "https://")):
        print(f"note: RAY_ADDRESS={redact(value)} is a dashboard URL, for `gradyard submit`; "
              "`gradyard run` trains from this process, on an embedded cluster "
              "(pass --address HOST:PORT to train on a running cluster's GCS)", file=sys.stderr)
        return None
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments `gradyard run` and `python -m gradyard.launch` share."""
    p.add_argument("file", help="job definition (YAML), e.g. jobs/mnist-lenet.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key, e.g. --set schedule.epochs=3")
    p.add_argument("--storage", help="put the run directory at URL/<job name>, e.g. s3://bucket/runs")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")


def print_summary(summary: dict) -> None:
    m = summary.get("metrics", {})
    acc = m.get("test_accuracy")
    line = f"[{summary['job']}] finished: {summary['steps']} steps, {summary['epochs']} epochs"
    if acc is not None:
        line += f", test accuracy {acc:.4f}"
    elif "test_loss" in m:
        line += f", test loss {m['test_loss']:.4f}"
    print(line)
    if summary.get("data", {}).get("synthetic"):
        print(f"[{summary['job']}] data: synthetic")
    run_url = summary.get("run_url")
    if run_url:
        print(f"[{summary['job']}] checkpoints: {run_url}/checkpoints  summary: {run_url}/summary.json")


def _run_dir(args):
    """The run directory a read command names; an error (exit 2) when there is nothing there."""
    from gradyard.storage import open_storage

    run = open_storage(args.run_url, args.endpoint_url)
    if not run.exists(run.root_path):
        raise CLIError(f"{run.shown}: no such run directory")
    return run


def _lineage(run) -> str | None:
    from gradyard.checkpoint import read_record

    rec = read_record(run)
    return None if rec.new else rec.run_id


def cmd_checkpoints(args) -> int:
    from gradyard.checkpoint import list_checkpoints

    run = _run_dir(args)
    infos = list_checkpoints(run, deep=not args.quick)
    run_id = _lineage(run)
    if args.json:
        print(json.dumps([dict(i.to_json(), lineage=i.lineage(run_id)) for i in infos], indent=2))
        return EXIT_OK
    if not infos:
        print(f"no checkpoints under {run.shown}/checkpoints")
        return EXIT_OK
    import datetime as dt

    print(f"{'STEP':>9}  {'EPOCH':>5}  {'TIME':19}  {'SIZE':>10}  {'LINEAGE':8}  STATUS")
    for i in infos:
        when = dt.datetime.fromtimestamp(i.time).strftime("%Y-%m-%d %H:%M:%S") if i.time else "-"
        size = f"{i.size_bytes / 1e6:.2f} MB"
        status = i.status + (f" ({i.problem})" if i.problem else "")
        epoch = "-" if i.epoch is None else str(i.epoch)
        lineage = i.lineage(run_id) if i.status == "complete" else "-"
        print(f"{i.step:>9}  {epoch:>5}  {when:19}  {size:>10}  {lineage:8}  {status}  {i.name}")
    return EXIT_OK


def cmd_export(args) -> int:
    import torch

    from gradyard.checkpoint import CorruptCheckpoint, list_checkpoints, load_blobs, read_verified

    run = _run_dir(args)
    infos = list_checkpoints(run)
    usable = [i for i in infos if i.status == "complete" and (args.step is None or i.step == args.step)]
    chosen = None
    for info in reversed(usable):  # newest first, verified as it is read
        size = int((info.files.get("model.pt") or {}).get("size", 0))
        if size > 50e6:  # a wait worth a line: the read and its sha256
            print(f"reading and verifying model.pt of step {info.step} ({size / 1e6:.0f} MB) from {run.shown}",
                  file=sys.stderr, flush=True)
        try:
            blobs = read_verified(run, info, names=("model.pt",))
            chosen = info
            break
        except CorruptCheckpoint as exc:
            print(f"warning: skipping checkpoint {info.name}: corrupt ({exc})", file=sys.stderr)
    if chosen is None:
        where = f"at step {args.step} " if args.step is not None else ""
        raise CLIError(f"no complete checkpoint {where}under {run.shown}/checkpoints")
    newer = [i for i in infos if i.step > chosen.step or (i.step == chosen.step and i is not chosen
                                                          and i.status != "complete")]
    if args.step is None and newer:
        print(f"warning: exporting step {chosen.step}, not the newest checkpoint directory: "
              + ", ".join(f"{i.name} is {i.status}" + (f" ({i.problem})" if i.problem else "") for i in newer),
              file=sys.stderr)
    state_dict = load_blobs(blobs)["model.pt"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out)
    print(f"exported the model state_dict of step {chosen.step} ({chosen.name}) to {out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="gradyard", description=__doc__, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"gradyard {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.",
                              epilog=f"example:\n  {example}", formatter_class=fmt)

    def json_flag(c: argparse.ArgumentParser, what: str) -> None:
        c.add_argument("--json", action="store_true", help=f"print {what} as JSON")

    def endpoint(c: argparse.ArgumentParser) -> None:
        c.add_argument("--endpoint-url", metavar="URL",
                       help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")

    v = command("validate", "check job files against the schema and the catalogue (imports no torch)",
                "gradyard validate jobs/*.yaml --set optimizer.lr=0.1")
    v.add_argument("files", nargs="+", help="job definitions (YAML)")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key in every file, e.g. --set schedule.epochs=3")
    json_flag(v, "a list of {file, ok, name, model, data | error}")
    v.set_defaults(fn=cmd_validate)

    j = command("jobs", "list the documented job definitions with their parameter counts", "gradyard jobs --json")
    json_flag(j, "a list of {file, name, model, data, parameters}")
    j.add_argument("--synthetic-shapes", action="store_true", help=argparse.SUPPRESS)
    j.set_defaults(fn=cmd_jobs)

    r = command("run", "train a job on Ray (an embedded cluster unless --address) and print its summary",
                "gradyard run jobs/mnist-lenet.yaml --storage s3://bucket/runs")
    add_run_arguments(r)
    r.add_argument("--address", metavar="HOST:PORT",
                   help="Ray cluster (GCS) address to train on; default: an embedded cluster in this process "
                        "(RAY_ADDRESS is used when it names a GCS address; a dashboard URL there is for "
                        "`gradyard submit`)")
    json_flag(r, "the run's summary (summary.json)")
    r.set_defaults(fn=cmd_run)

    c = command("checkpoints", "list a run's checkpoints: step, size, lineage, status",
                "gradyard checkpoints s3://bucket/runs/mnist-lenet --json")
    c.add_argument("run_url", help="run directory: a path, file:// or s3:// URL (<storage>/<job name>)")
    json_flag(c, "a list of checkpoints with their status and lineage")
    c.add_argument("--quick", action="store_true", help="check sizes only, not sha256")
    endpoint(c)
    c.set_defaults(fn=cmd_checkpoints)

    e = command("export", "write a checkpoint's model state_dict for inference",
                "gradyard export runs/mnist-lenet --out lenet.pt")
    e.add_argument("run_url", help="run directory: a path, file:// or s3:// URL")
    e.add_argument("--out", required=True, help="file to write (torch.save of the state_dict)")
    e.add_argument("--step", type=int, help="export this step (default: the newest complete checkpoint)")
    endpoint(e)
    e.set_defaults(fn=cmd_export)

    sc = command("schema", "print the job file's JSON Schema (every field documented), or its reference page",
                 "gradyard schema > job.schema.json")
    sc.add_argument("--markdown", action="store_true", help="print docs/jobs.md instead")
    sc.set_defaults(fn=cmd_schema)

    add_submit_commands(command)
    cal = command("calibrate", "measure this device's FLOP/s, memory bandwidth and per-op overhead",
                  "gradyard calibrate --quick")
    json_flag(cal, "the device profile")
    cal.add_argument("--quick", action="store_true", help="fewer, smaller measurements")
    cal.set_defaults(fn=cmd_calibrate)

    an = command("analyze", "is a run compute-, memory-, overhead-, communication- or input-bound?",
                 "gradyard analyze runs/fashion-cnn --out report/")
    an.add_argument("run_url", help="run directory (telemetry on, past the live census's steps)")
    an.add_argument("--out", help="folder for roofline.png, step_breakdown.png and report.md")
    an.add_argument("--probe", action="store_true",
                    help="time the job's step here at its batch and twice it (the batch-scaling probe): "
                         "the overhead share from what does not grow with the batch")
    json_flag(an, "the verdict as one object")
    endpoint(an)
    an.set_defaults(fn=cmd_analyze)
    return p


def cmd_schema(args) -> int:
    from gradyard.schema import cmd_schema as schema

    return schema(args)


def cmd_calibrate(args) -> int:
    from gradyard.analysis import run_calibrate

    return run_calibrate(json_out=args.json, quick=args.quick)


def cmd_analyze(args) -> int:
    from gradyard.analysis import run_analyze
    from gradyard.steptime import CENSUS_RECORD_AT_STEP
    from gradyard.storage import open_storage

    run = open_storage(args.run_url, args.endpoint_url)
    try:
        with run.fs.open(run.join("analysis", "step.json"), "rb") as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        raise CLIError(f"{redact(run.url)}/analysis/step.json not found: the run has no measured "
                       f"step yet (telemetry must be on, and the run must pass step {CENSUS_RECORD_AT_STEP})") from None
    return run_analyze(record, out_dir=args.out, json_out=args.json, probe=args.probe)


def dispatch(command) -> int:
    """Run ``command()`` and map its errors to one redacted line and the exit-status scheme."""
    try:
        return command() or EXIT_OK
    except (JobError, StorageError, CLIError, SubmitError) as exc:
        print(f"error: {redact(exc)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        from gradyard.runner import RunError

        if isinstance(exc, RunError):
            print(f"error: training failed: {redact(exc)}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        if os.environ.get("GRADYARD_DEBUG"):
            raise
        first = (redact(exc).strip().splitlines() or [""])[0]
        print(f"error: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse's message and exit status 2
    return dispatch(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
