#!/usr/bin/env bash
# The tutorial's full run on one GPU: the `article` recipe (25 epochs at 224x224, batch 256,
# SGD 0.01, x0.96 every 8 epochs, main + 0.3 aux1 + 0.3 aux2) in bf16 autocast + channels_last.
# usage: bench/gpu_article.sh DATA_ROOT RUN_DIR [--set key=value ...]
set -euo pipefail
data=$1
out=$2
shift 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
TQDM_DISABLE=1 PYTHONPATH=src python3 -m googlenet train --recipe article --data "$data" \
  --out "$out" "$@"
echo "wall $(($(date +%s) - start)) s"
