#!/usr/bin/env bash
# The one device call for issue 9's GPU measurement (H100 or H200; about 3-5 minutes):
#
#   here, once:  pip download eai-sparsify --no-deps -d bench/.wheels
#   device run:  command "bash bench/device_check.sh", carry ["bench/.wheels"], timeout_s 480
#
# The machine's image has python3 with torch (CUDA) and Triton but not this project's other
# dependencies; the benchmark needs torch alone and runs from the source tree. It first checks
# the fast path against the reference path on the GPU (bench/sae_gpu.py's `check` lines), then
# measures; the JSON lines come back through $OUT, to be committed here under bench/results/.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 bench/sae_gpu.py 2>&1 | tee bench/results/sae_gpu_log.txt   # writes bench/results/sae_gpu_<device>.jsonl
if [ -n "${OUT:-}" ]; then cp bench/results/sae_gpu_*.jsonl bench/results/sae_gpu_log.txt "$OUT"/; fi
