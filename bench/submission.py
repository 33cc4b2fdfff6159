"""6. Submission: seconds from `ray job submit` to the first training step, on a running cluster.

Both contenders are submitted the README's way (``ray job submit --address ...
--working-dir . --no-wait -- ENTRYPOINT``) to the bench's running cluster:
``python -m gradyard.launch JOB`` and the plain Ray Train script.  The clock
starts just before the ``ray job submit`` process starts and stops when the
job's first optimizer step ends (its own ``first_step_at``).  One untimed
submission first caches the working directory's package on the cluster.  The
throughput benchmark's fashion-cnn rounds are these submissions when it runs.
"""

from __future__ import annotations

from bench.throughput import first_step_latency, own_rounds

NAME = "submit"
TITLE = "6. Submission latency"
NEEDS_CLUSTER = True


def run(bench, size, shared, say=print) -> dict:
    got = shared.get("submit_rounds")
    if got is not None:
        return first_step_latency(got, "the throughput benchmark's fashion-cnn rounds")
    return first_step_latency(own_rounds(bench, size, "job", say), "its own rounds")
