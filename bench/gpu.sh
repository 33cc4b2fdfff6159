#!/usr/bin/env bash
# bench/gpu.sh [--dry] [--rounds N] [--steps N]: gradyard on one GPU under plain torchrun (no Ray).
#
# Runs the CUDA-only tests, then `python -m bench.gpu`: gradyard against a plain torchrun script on
# AlexNet and EfficientNet-B0 (bf16), telemetry on vs off, the checkpoint stall, the NVML series and
# MFU on the metrics endpoint, MFU against the measured and published peaks, and the live verdict.
# Results: bench/results/gpu.json and gpu.md; commit them.  Under 8 minutes on one GPU.
# --dry runs the same on the CPU at a few steps (the smoke test's): it proves the script, not the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
export PYTHONPATH="$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The CUDA-only tests, in the files that hold them (the others need Ray, S3 or hypothesis, which a GPU
# machine may not have). --collect only collects them: the smoke test checks that works without Ray.
CUDA_TESTS=(tests/test_analysis.py tests/test_telemetry.py)
if [ "${1:-}" = "--collect" ]; then
  exec "$PY" -m pytest -q -m cuda -p no:cacheprovider --collect-only "${CUDA_TESTS[@]}"
fi
if [ "${1:-}" != "--dry" ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device (use --dry on a CPU)")'
  "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs "${CUDA_TESTS[@]}"  # skipped = failed here: -rs says why
fi
exec "$PY" -m bench.gpu "$@"
