"""7. Start-up: seconds from `gradyard run` to the first step on an embedded cluster, vs plain Ray Train.

No cluster is running: ``gradyard run JOB`` starts Ray in its own process
(``ray.init(address="local")``), and so does the plain Ray Train script
(``--address local``).  The clock starts just before the command's process
starts and stops when its first optimizer step ends.  The throughput
benchmark's AlexNet rounds are these runs when it runs them.
"""

from __future__ import annotations

from bench.throughput import first_step_latency, own_rounds

NAME = "startup"
TITLE = "7. Start-up on an embedded cluster"
NEEDS_CLUSTER = False


def run(bench, size, shared, say=print) -> dict:
    got = shared.get("startup_rounds")
    if got is not None:
        return first_step_latency(got, "the throughput benchmark's AlexNet rounds")
    if not size.embedded_startup and shared.get("submit_rounds"):
        return first_step_latency(shared["submit_rounds"], "the submissions (smoke size: no embedded cluster)")
    bench.stop_cluster()
    return first_step_latency(own_rounds(bench, size, "embedded", say), "its own rounds")
