"""Telemetry on vs off inside one run: two gradyard trainers taking turns in the same processes.

Run under torchrun (2 workers, gloo)::

    torchrun --standalone --nproc-per-node=2 bench/scripts/telemetry_ab.py jobs/fashion-cnn.yaml \\
        --storage DIR --block 25 --out result.json --set schedule.steps=2000 ...

Each worker builds the same job twice with gradyard's own worker code
(``gradyard.worker.build_callbacks``, ``Trainer`` and its ``CheckpointManager``): once with
``telemetry.enabled=true`` and once with ``false``, each with its own model,
DDP wrapper and run directory.  Each trainer's ``fit()`` runs in its own
thread, and a baton hands the workers' one CPU back and forth every
``--block`` steps (on, off, off, on, on, off, ...), so only one trainer steps
at a time.  Both ranks hand over at the same steps, so their collectives stay in
the same order.

Whole-job runs on two shared cores differ by ±10% from one run to the next
(placement, what else the machine runs), which hides a 2% effect however
many runs are averaged in a 30-minute budget; blocks a third of a second
apart, in the same processes, see the same conditions.  Each pair of
neighbouring blocks gives a ratio (on / off time for the same number of
steps); every cost of telemetry is inside the blocks: the callbacks, the
DDP communication hook, the steps whose FLOPs are counted, the census.

Rank 0 writes ``--out``: the block times of each arm and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from gradyard.events import Callback, Event
from gradyard.hostmem import tune_host_allocator
from gradyard.job import load_job
from gradyard.checkpoint import CheckpointManager, record_start
from gradyard.train import shutdown_process_group
from gradyard.worker import build_callbacks, dist_info, run_directory
from gradyard.trainer import Trainer

ARMS = ("on", "off")


class Baton:
    """Whose turn it is; each arm's clock runs only while it holds the baton.

    Turns go A B B A, A B B A, ... (A the ``first`` arm): each arm takes the first
    block of half the pairs, so an advantage of going first or second in a pair
    cancels inside every run (with strict A B A B, runs that started with the
    off arm measured ~2% higher than runs that started with the on arm).
    """

    def __init__(self, first: str = ARMS[0]) -> None:
        self.first = first
        self.turn = first
        self.handovers = 0
        self.cond = threading.Condition()
        self.failed: BaseException | None = None
        self.started: dict[str, float] = {}
        self.blocks: dict[str, list[float]] = {arm: [] for arm in ARMS}

    def wait(self, arm: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == arm or self.failed is not None)
            if self.failed is not None:
                raise RuntimeError("the other arm failed")
        self.started[arm] = time.perf_counter()

    def pass_on(self, arm: str, record: bool, done: bool = False) -> None:
        """End ``arm``'s block; the next block is the sequence's, or the other arm's once ``done``."""
        if record:
            self.blocks[arm].append(time.perf_counter() - self.started[arm])
        with self.cond:
            self.handovers += 1
            second = ARMS[1 - ARMS.index(self.first)]
            self.turn = (ARMS[1 - ARMS.index(arm)] if done
                         else self.first if self.handovers % 4 in (0, 3) else second)
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self.failed = exc
            self.cond.notify_all()


class Turns(Callback):
    """Last callback of each arm: takes the baton at FIT_START, hands it over every ``block`` steps.

    The first ``warmup`` steps are not recorded (the census runs at step 5 of
    the telemetry arm, FLOPs are counted at step 0; both are recorded when
    they recur, at ``measure_flops_every``).  The last step keeps the baton:
    evaluation and FIT_END run in the same turn (they are collectives).
    """

    name = "bench_turns"

    def __init__(self, baton: Baton, arm: str, block: int, warmup: int, steps: int):
        self.baton, self.arm, self.block, self.warmup, self.steps = baton, arm, block, warmup, steps

    def on_event(self, event: Event, state) -> None:
        if event is Event.FIT_START:
            self.baton.wait(self.arm)
        elif event is Event.BATCH_END and state.step % self.block == 0 and state.step < self.steps:
            self.baton.pass_on(self.arm, record=state.step > self.warmup)
            self.baton.wait(self.arm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="telemetry_ab.py")
    p.add_argument("job")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--storage", required=True)
    p.add_argument("--block", type=int, default=25, help="steps per turn")
    p.add_argument("--warmup", type=int, default=50, help="steps before the first recorded block")
    p.add_argument("--out", required=True)
    p.add_argument("--first", choices=ARMS, default="on",
                   help="the arm that takes the first turn (alternated between runs too)")
    p.add_argument("--drop", default="", help="comma-separated callback classes left out of the "
                   "telemetry arm (to attribute the overhead to its parts)")
    args = p.parse_args(argv)

    tune_host_allocator()  # as gradyard's worker does first (run_worker)
    dist.init_process_group("gloo")
    info = dist_info("torchrun")
    baton = Baton(args.first)
    trainers, threads = {}, []
    for arm in ARMS:  # built in the same order on every rank: DDP's constructor is a collective
        spec = load_job(args.job, [*args.overrides, f"telemetry.enabled={'true' if arm == 'on' else 'false'}",
                                   f"name=bench-telemetry-{arm}"])
        if spec.schedule.steps is None or spec.schedule.steps % args.block:
            raise SystemExit("--set schedule.steps=N with N a multiple of --block")
        storage = run_directory(spec, os.path.join(args.storage, arm), check=info.rank == 0)
        callbacks = build_callbacks(spec, storage, info, "torchrun")
        if arm == "on" and args.drop:
            callbacks = [cb for cb in callbacks if type(cb).__name__ not in args.drop.split(",")]
        callbacks.append(Turns(baton, arm, args.block, args.warmup, spec.schedule.steps))
        record = record_start(storage) if info.rank == 0 else None
        box = [record]
        dist.broadcast_object_list(box, src=0)
        manager = CheckpointManager(spec, storage, rank=info.rank, world_size=info.world_size, record=box[0])
        trainers[arm] = Trainer(spec, storage, info, f"ab-{arm}", callbacks, checkpointer=manager)

    def run(arm: str) -> None:
        try:
            trainers[arm].fit()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            traceback.print_exc()
            baton.fail(exc)
            return
        baton.pass_on(arm, record=False, done=True)  # after its evaluation: the other arm's last block

    t0 = time.perf_counter()
    for arm in ARMS:
        threads.append(threading.Thread(target=run, args=(arm,), name=f"arm-{arm}"))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if baton.failed is not None:
        return 1
    on, off = baton.blocks["on"], baton.blocks["off"]
    n = min(len(on), len(off))
    ratios = [a / b for a, b in zip(on[:n], off[:n])]
    if info.rank == 0:
        result = {
            "block_steps": args.block, "warmup_steps": args.warmup, "pairs": n, "wall_seconds": wall,
            "block_seconds": {"on": on[:n], "off": off[:n]},
            "pair_ratios": ratios,
            "median_pair_ratio": statistics.median(ratios) if ratios else None,
            "total_ratio": sum(on[:n]) / sum(off[:n]) if n else None,
            "step_seconds": {"on": sum(on[:n]) / (n * args.block) if n else None,
                             "off": sum(off[:n]) / (n * args.block) if n else None},
            "first": args.first, "dropped": [x for x in args.drop.split(",") if x],
            "world_size": info.world_size, "threads": torch.get_num_threads(),
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    trainers.clear()  # both DDP wrappers go before the process group does
    shutdown_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
