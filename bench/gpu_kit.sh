#!/usr/bin/env bash
# The GPU kit's one command on a lent GPU machine (see bench/gpu_kit.py):
#   bash bench/gpu_kit.sh            # figures into $OUT, or ./gpu-kit-out
# carrying .whl/ (built here with `make gpu-wheels`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_kit.py --out "${OUT:-gpu-kit-out}" "$@"
