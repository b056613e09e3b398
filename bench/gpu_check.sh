#!/usr/bin/env bash
# The SAE GPU measurement in one command, on a GPU machine (H100 or H200; about 3-5 minutes)
# that has python3 with torch (CUDA) and Triton but none of this project's other dependencies:
# the benchmark needs torch alone and runs from the source tree.
#
#   where there is network, once:  pip download eai-sparsify --no-deps -d bench/.wheels
#   on the GPU machine:            bash bench/gpu_check.sh
#
# It first checks the fast path against the reference path on the GPU (bench/sae_gpu.py's
# `check` lines), then measures; results land in bench/results/sae_gpu_<device>.jsonl (and in
# $OUT too, when that names a folder to collect them in).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 bench/sae_gpu.py 2>&1 | tee bench/results/sae_gpu_log.txt   # writes bench/results/sae_gpu_<device>.jsonl
if [ -n "${OUT:-}" ]; then cp bench/results/sae_gpu_*.jsonl bench/results/sae_gpu_log.txt "$OUT"/; fi
