"""Several gradyard runs on one Ray Train worker group (tests and benchmarks).

Starting a worker group costs seconds; a suite that trains many small jobs
shares one.  Each run goes through gradyard's real worker entry
(:func:`gradyard.train.run_worker`): its own data, model, DDP wrapper,
optimizer, checkpoints and summary.
"""

from __future__ import annotations

import sys

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import testkit


def run_each(config: dict) -> None:
    """Ray Train ``train_loop_per_worker``: ``config["runs"]`` is a list of worker configs."""
    from gradyard.worker import run_worker

    for run in config["runs"]:
        run_worker(run)
