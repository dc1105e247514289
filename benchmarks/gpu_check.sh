#!/usr/bin/env bash
# GPU check (issue 14): the gpu tests, CLIP2FL round timings (fp32/bf16, cached vs per-step teacher),
# CLIP feature-cache throughput and the CIFAR-10-LT CLIP2FL reference schedule timed for a few rounds
# and extrapolated to 200; one table and benchmarks/results/gpu_check.json (parts: gpu_check.py).
# Under 8 minutes on one H100/H200-class GPU, offline, no pretrained weights.
#
#   bash benchmarks/gpu_check.sh [--root CIFAR10_DIR] [--rounds 3] [--out FILE]
#
# PYTHON picks the interpreter (default: python). After GPU_CHECK_LIMIT_S seconds (default 440) the
# driver gets SIGINT and reports the parts it finished; exit 0 only when every part ran and passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check.sh: CUDA is required (torch.cuda.is_available() is not true for $PYTHON); run it on a machine with an NVIDIA GPU" >&2
    exit 2
fi
exec timeout --preserve-status -s INT -k 30 "${GPU_CHECK_LIMIT_S:-440}" "$PYTHON" benchmarks/gpu_check.py "$@"
