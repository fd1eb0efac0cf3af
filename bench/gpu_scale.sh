#!/usr/bin/env bash
# The device check for issue 14 (ImageNet scale), one short script: the decode benchmark on all
# cores, then bench/gpu_scale.py (bn at 224 from memory, from a folder, from shards).
# usage: bench/gpu_scale.sh   (PYTHONPATH gets src and, when present, .gpu-deps for webdataset)
set -uo pipefail
export PYTHONPATH="src:.gpu-deps:${PYTHONPATH:-}" TQDM_DISABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
lscpu | grep -E "Model name|^CPU\(s\)" || true
uptime
timeout 70 python3 bench/bench_decode.py --images 200 --sizes full,400,320 --gpu-img-s 2500
timeout 170 python3 bench/gpu_scale.py --images "${IMAGES:-8000}"
uptime
