"""``python -m bench [--quick] [--only NAME ...] [--repeats N]``: run the benchmarks, write the page.

Results go to ``bench/results/latest.json``; the generated block of
``docs/benchmarks.md`` is rewritten from them and the hand-written text around it
is kept.  With ``--only``, the other benchmarks' previous results are kept (each
says when and at which size it was measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import checkpointing, faults, recovery, report, startup, submission, telemetry, throughput
from bench.env import ROOT, Bench, calibrate_once, machine, versions
from bench.settings import FULL, QUICK, SMOKE

# Submission and start-up after throughput (they reuse its rounds); start-up last (it stops the shared cluster).
BENCHMARKS = [throughput, checkpointing, recovery, faults, telemetry, submission, startup]
NAMES = [b.NAME for b in BENCHMARKS]


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs and 3 rounds (says so on the page)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                   help=f"run only these: {', '.join(NAMES)}")
    p.add_argument("--repeats", type=int, help="rounds per comparison (default 4; --quick 3)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp folder and its logs")
    p.add_argument("--allocator-split", action="store_true",
                   help="also run gradyard with glibc malloc's defaults (GRADYARD_MALLOC_TUNING=0) in the "
                        "fashion-cnn throughput rounds: what gradyard.hostmem's settings gain")
    # The smoke test's: a running cluster (GCS address, dashboard URL) and a calibration cache to reuse.
    p.add_argument("--cluster", nargs=2, metavar=("ADDRESS", "DASHBOARD"), help=argparse.SUPPRESS)
    p.add_argument("--calibration", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    size = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.repeats:
        size = size.with_repeats(args.repeats)
    selected = [b for b in BENCHMARKS if not args.only or b.NAME in args.only]
    names = [b.NAME for b in selected]
    command = "python -m bench" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                   if (argv if argv is not None else sys.argv[1:]) else "")
    started = time.time()
    # SIGTERM ends the bench the way Ctrl-C does: its cluster and servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def say(msg: str) -> None:
        print(f"[bench {time.time() - started:6.0f}s] {msg}", flush=True)

    results: dict = {}
    with Bench(keep=args.keep_tmp, cluster=args.cluster) as bench:
        say(f"size {size.name}, {size.repeats} round(s); temp folder {bench.tmp}")
        if any(n != "checkpoint" for n in names):
            calibrate_once(args.calibration)
        shared: dict = {"allocator_split": args.allocator_split}
        for b in selected:
            say(f"{b.NAME}: {b.TITLE}")
            t0, load0 = time.time(), os.getloadavg()[0]
            try:
                res = b.run(bench, size, shared, say)
                res["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - one failed benchmark must not hide the rest
                traceback.print_exc()
                res = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
            res.update(title=b.TITLE, size=size.name, repeats=size.repeats,
                       measured_at=dt.datetime.now().isoformat(timespec="seconds"),
                       seconds=round(time.time() - t0, 1),
                       load_average=[round(load0, 2), round(os.getloadavg()[0], 2)])
            results[b.NAME] = res
            say(f"{b.NAME}: {res['status']} in {res['seconds']:.0f}s")
            if not any(x.NEEDS_CLUSTER for x in selected[selected.index(b) + 1:]):
                bench.stop_cluster()
        environment = bench.environment
    doc = _merge(args.results, {
        "generated_at": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command, "size": size.name, "repeats": size.repeats,
        "total_seconds": round(time.time() - started, 1),
        "machine": machine(), "versions": versions(), "environment": environment,
        "benchmarks": results,
    }, partial=bool(args.only))
    if not args.only and size is FULL:  # what `make bench` took, kept across later --only runs
        doc["last_full_run"] = {k: doc[k] for k in ("command", "generated_at", "total_seconds")}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    page = args.docs.read_text() if args.docs.exists() else ""
    args.docs.write_text(report.render(doc, page, {b.NAME: b.TITLE for b in BENCHMARKS}))
    say(f"wrote {args.results} and {args.docs}")
    return 1 if any(r["status"] != "ok" for r in results.values()) else 0


def _merge(path: Path, new: dict, partial: bool) -> dict:
    """Keep the previous results of benchmarks this invocation did not run."""
    if not partial or not path.exists():
        return new
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return new
    benchmarks = {**old.get("benchmarks", {}), **new["benchmarks"]}
    return {**new, "benchmarks": {n: benchmarks[n] for n in NAMES if n in benchmarks},
            "last_full_run": old.get("last_full_run")}


if __name__ == "__main__":
    sys.exit(main())
