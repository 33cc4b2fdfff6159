"""The entrypoint that runs on a Ray cluster, under ``ray job submit``::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m gradyard.launch jobs/fashion-cnn.yaml --set schedule.epochs=5

The job is validated before any worker starts: a bad file fails the Ray job
at once, with the same message as ``gradyard validate`` and no traceback.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from gradyard.cli import add_run_arguments, cmd_run, dispatch

    p = argparse.ArgumentParser(prog="python -m gradyard.launch",
                                description="Train a job on the Ray cluster this runs on (the entrypoint of "
                                            "`ray job submit`); the same as `gradyard run` there.")
    add_run_arguments(p)
    args = p.parse_args(argv)
    return dispatch(lambda: cmd_run(args, on_cluster=True))


if __name__ == "__main__":
    sys.exit(main())
