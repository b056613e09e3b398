#!/usr/bin/env bash
# The SAE GPU checks and measurements in one command, on a GPU machine (H100 or H200; about 5 minutes)
# that has python3 with torch (CUDA) and Triton but none of this project's other dependencies:
# the benchmark needs torch alone and runs from the source tree.
#
#   where there is network, once:  pip download eai-sparsify --no-deps -d bench/.wheels
#   on the GPU machine:            bash bench/gpu_check.sh
#
# bench/sae_gpu.py first checks the fast path against the reference path on the GPU (`check` lines),
# then trains 40 steps with each optimizer checking at every forward that the bf16 encoder mirror is
# bf16 of the current weights (`mirror_steps`), runs one 1M-latent SparseAdam step with 15 GiB held
# by a dummy tensor (the live 8B model's share: `sparseadam_beside_model`), then measures the steps.
# Each result is appended to bench/results/sae_gpu_<device>.jsonl as it is measured; a case that
# fails is recorded with its error and the others still run. Everything is copied to $OUT (when that
# names a folder to collect them in) even when the benchmark itself fails.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee bench/results/sae_gpu_log.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    2>&1 | tee -a bench/results/sae_gpu_log.txt
python3 bench/sae_gpu.py 2>&1 | tee -a bench/results/sae_gpu_log.txt   # appends to bench/results/sae_gpu_<device>.jsonl
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp bench/results/sae_gpu_*.jsonl bench/results/sae_gpu_log.txt "$OUT"/ 2>/dev/null; fi
exit "$status"
