"""``python testkit/launch_faults.py [--slow S] [--kill-at STEPS --kill-rank R --marker F] [--hold-until F
--marker F] gradyard-run-args``.

What ``gradyard run`` (and ``python -m gradyard.launch``) does, with fault
callbacks passed in explicitly, as tests inject faults: it calls
``gradyard.runner.run_job(..., callbacks=[...])``.  ``--on-cluster`` makes it
the ``ray job submit`` entrypoint (it joins the job's own cluster).
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    from gradyard.cli import add_run_arguments, dispatch, print_summary
    from gradyard.job import load_job
    from gradyard.runner import run_job
    from testkit.faults import HoldAtEnd, KillAtStep, SlowSteps

    p = argparse.ArgumentParser()
    add_run_arguments(p)
    p.add_argument("--address")
    p.add_argument("--on-cluster", action="store_true")
    p.add_argument("--slow", type=float, default=0.0, help="seconds of sleep after every step")
    p.add_argument("--kill-at", default="", help="comma-separated steps at which --kill-rank SIGKILLs itself")
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--marker", default="")
    p.add_argument("--hold-until", default="", help="every rank waits at the end of training until this file exists")
    args = p.parse_args()
    callbacks = []
    if args.slow:
        callbacks.append(SlowSteps(args.slow))
    if args.kill_at:
        callbacks.append(KillAtStep([int(s) for s in args.kill_at.split(",")], args.kill_rank, args.marker))
    if args.hold_until:
        callbacks.append(HoldAtEnd(args.hold_until, args.marker))

    def run() -> int:
        spec = load_job(args.file, args.overrides)
        print_summary(run_job(spec, address=args.address, storage_url=args.storage, fresh=args.fresh,
                              on_cluster=args.on_cluster, callbacks=callbacks))
        return 0

    return dispatch(run)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/testkit/", 1)[0])  # run as a script: testkit importable
    sys.exit(main())
