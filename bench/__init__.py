"""gradyard's benchmarks against what a user would run instead, measured side by side.

    python -m bench                      # everything, 5 rounds each (`make bench`, < 30 min on 2 cores)
    python -m bench --quick              # tiny sizes, 2 rounds: checks that it all runs
    python -m bench --only throughput telemetry --repeats 7

Writes bench/results/latest.json and regenerates docs/benchmarks.md.  Modules:
``throughput`` (1), ``checkpointing`` and ``recovery`` (2), ``telemetry`` (3),
``submission`` (4), ``startup`` (5); ``contenders`` runs one workload the four
ways; ``scripts/`` holds the plain torchrun and Ray Train scripts; ``env`` owns
the temp folder, the Ray cluster and the S3 server; ``report`` writes the page.
"""
