"""``torchrun ... testkit/torchrun_faults.py [--slow S] [--kill-at STEPS --kill-rank R --marker F] JOB ...``.

gradyard's torchrun entry (``gradyard.train.main``) with fault callbacks passed in
explicitly, the way tests inject faults: every other argument goes to it unchanged.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    from gradyard.train import main as train_main
    from testkit.faults import KillAtStep, SlowSteps

    p = argparse.ArgumentParser()
    p.add_argument("--slow", type=float, default=0.0, help="seconds of sleep after every step")
    p.add_argument("--kill-at", default="", help="comma-separated steps at which --kill-rank SIGKILLs itself")
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--marker", default="")
    args, rest = p.parse_known_args()
    callbacks = []
    if args.slow:
        callbacks.append(SlowSteps(args.slow))
    if args.kill_at:
        callbacks.append(KillAtStep([int(s) for s in args.kill_at.split(",")], args.kill_rank, args.marker))
    return train_main(rest, callbacks=callbacks)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/testkit/", 1)[0])  # run as a script: testkit importable
    sys.exit(main())
