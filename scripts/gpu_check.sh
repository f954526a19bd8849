#!/usr/bin/env bash
# The GPU checks, as one script for a CUDA machine (run from the repository root):
# the CUDA tests, then the book-preset benchmark with CUDA graphs (default) and without.
# Usage: bash scripts/gpu_check.sh [OUT_DIR] [EPOCHS]
set -uo pipefail
out=${1:-runs/gpu}
epochs=${2:-100}
mkdir -p "$out"
python=${PYTHON:-python3}
nvidia-smi -L
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$python" -m pytest -q -p no:cacheprovider tests/training/test_cuda.py 2>&1 | tail -15
"$python" bench.py --device cuda --epochs "$epochs" --no-reference \
  --write "$out/benchmarks_gpu.md" 2>"$out/bench_gpu.log"
"$python" bench.py --device cuda --epochs "$epochs" --no-reference \
  --presets rnn_scratch gru_scratch lstm_scratch --set train.cuda_graphs=false \
  --write "$out/benchmarks_gpu_eager.md" 2>"$out/bench_gpu_eager.log"
