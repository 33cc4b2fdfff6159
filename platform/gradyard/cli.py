"""The `gradyard` command.  Errors are one clear message and a non-zero exit, never a traceback.

Exit status: 0 ok; 1 the job or training failed; 2 bad usage, a bad job file, or missing or unusable
input (a dataset, storage, a run directory in use by another driver).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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
    bad = 0
    for f in args.files:
        try:
            spec = load_job(f, args.overrides)
            print(f"{f}: ok ({spec.name}: {spec.model.arch} on {redact(spec.data.source)})")
        except JobError as exc:
            print(redact(str(exc)), file=sys.stderr)
            bad += 1
    return EXIT_USAGE if bad else EXIT_OK


def cmd_jobs(args) -> int:
    import torch  # noqa: F401 - fail early and clearly if torch is missing

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
    summary = run_job(spec, address=getattr(args, "address", None), storage_url=args.storage,
                      fresh=args.fresh, on_cluster=on_cluster)
    print_summary(summary)
    return EXIT_OK


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
    p = argparse.ArgumentParser(prog="gradyard", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="validate job files")
    v.add_argument("files", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=cmd_validate)

    j = sub.add_parser("jobs", help="list the documented job definitions")
    j.add_argument("--json", action="store_true")
    j.add_argument("--synthetic-shapes", action="store_true", help=argparse.SUPPRESS)
    j.set_defaults(fn=cmd_jobs)

    r = sub.add_parser("run", help="train a job on Ray (an embedded cluster unless --address)")
    add_run_arguments(r)
    r.add_argument("--address", help="Ray cluster address (default: start an embedded cluster)")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("checkpoints", help="list a run's checkpoints and their status")
    c.add_argument("run_url")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quick", action="store_true", help="check sizes only, not sha256")
    c.add_argument("--endpoint-url")
    c.set_defaults(fn=cmd_checkpoints)

    e = sub.add_parser("export", help="write a checkpoint's model state_dict for inference")
    e.add_argument("run_url")
    e.add_argument("--out", required=True)
    e.add_argument("--step", type=int)
    e.add_argument("--endpoint-url")
    e.set_defaults(fn=cmd_export)

    add_submit_commands(sub)
    cal = sub.add_parser("calibrate", help="measure this device's FLOP/s, bandwidth, overhead")
    cal.add_argument("--json", action="store_true")
    cal.add_argument("--quick", action="store_true", help="fewer, smaller measurements")
    cal.set_defaults(fn=cmd_calibrate)

    an = sub.add_parser("analyze", help="compute-, memory-, overhead-, communication- or input-bound?")
    an.add_argument("run_url")
    an.add_argument("--out", help="folder for roofline.png, step_breakdown.png and report.md")
    an.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    an.add_argument("--endpoint-url")
    an.set_defaults(fn=cmd_analyze)
    return p


def cmd_calibrate(args) -> int:
    from gradyard.analysis import run_calibrate

    return run_calibrate(json_out=args.json, quick=args.quick)


def cmd_analyze(args) -> int:
    from gradyard.analysis import run_analyze
    from gradyard.storage import open_storage

    run = open_storage(args.run_url, args.endpoint_url)
    try:
        with run.fs.open(run.join("analysis", "step.json"), "rb") as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        raise CLIError(f"{redact(run.url)}/analysis/step.json not found: the run has no measured "
                       "step yet (telemetry must be on, and the run must pass step 7)") from None
    return run_analyze(record, out_dir=args.out, json_out=args.json)


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
        print(f"error: {type(exc).__name__}: {redact(exc)}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return dispatch(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
