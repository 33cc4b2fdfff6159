"""``torchrun ... testkit/torchrun_faults.py [--slow S] [--kill-at STEPS --kill-rank R --marker F]
[--stale-reads-rank R --stale-step N] JOB ...``.

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
    p.add_argument("--stale-reads-rank", type=int, default=-1,
                   help="this rank reads a stale copy of checkpoint step --stale-step (one byte differs): "
                        "the view of a node whose filesystem lags")
    p.add_argument("--stale-step", type=int, default=-1)
    args, rest = p.parse_known_args()
    if args.stale_reads_rank >= 0:
        import os

        if int(os.environ.get("RANK", "0")) == args.stale_reads_rank:
            _stale_reads(args.stale_step)
    callbacks = []
    if args.slow:
        callbacks.append(SlowSteps(args.slow))
    if args.kill_at:
        callbacks.append(KillAtStep([int(s) for s in args.kill_at.split(",")], args.kill_rank, args.marker))
    return train_main(rest, callbacks=callbacks)


def _stale_reads(step: int) -> None:
    """Every read of that checkpoint's model.pt by this process returns it with one byte flipped
    (and, as a lagging copy would, hashes to those bytes)."""
    import hashlib

    from gradyard.storage import Storage

    read = Storage.read_hashed
    name = f"step_{step:09d}"

    def stale(self, path, *a, **kw):
        data, digest = read(self, path, *a, **kw)
        if f"/{name}" in path and path.endswith("/model.pt"):
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            digest = hashlib.sha256(data).hexdigest()
        return data, digest

    Storage.read_hashed = stale


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/testkit/", 1)[0])  # run as a script: testkit importable
    sys.exit(main())
