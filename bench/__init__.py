"""gradyard's benchmarks against what a user would run instead, measured side by side.

    python -m bench                      # everything (`make bench`, about 20 min on 2 cores)
    python -m bench --quick              # 3 rounds, shorter runs
    python -m bench --only throughput telemetry --repeats 8
    bench/gpu.sh                         # one GPU, plain torchrun, no Ray (bench/gpu.py)

Writes bench/results/latest.json and the generated block of docs/benchmarks.md.
One module per benchmark (``throughput``, ``checkpointing``, ``recovery``,
``faults``, ``telemetry``, ``submission``, ``startup``), each returning its
tables and targets as data; ``contenders`` runs one workload the ways it is
compared; ``scripts/`` holds the plain torchrun and Ray Train scripts; ``stats``
decides targets by their intervals; ``env`` owns the temp folder, the Ray
cluster and the S3 server; ``report`` formats the data; ``profile`` sorts py-spy
samples by module.
"""
