"""The entrypoint that runs on a Ray cluster, under ``ray job submit``::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m gradyard.launch jobs/fashion-cnn.yaml --set schedule.epochs=5

The job is validated before any worker starts: a bad file fails the Ray job
at once, with the same message as ``gradyard validate`` and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from gradyard.job import JobError, load_job
from gradyard.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradyard.launch")
    p.add_argument("job", help="job definition, relative to the job's working directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--storage", help="put the run directory at URL/<job name>")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    args = p.parse_args(argv)
    try:
        spec = load_job(args.job, args.overrides)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    from gradyard.cli import print_summary
    from gradyard.runner import RunError, run_job

    try:
        summary = run_job(spec, storage_url=args.storage, fresh=args.fresh, on_cluster=True)
    except (JobError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RunError as exc:
        print(f"error: training failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
