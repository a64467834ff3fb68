#!/usr/bin/env bash
# One NVIDIA GPU (H100/H200 class), under 8 minutes: LoRA and full fine-tuning throughput of adaptext's
# training loop for MiniLM and MPNet at length 128, batch 64, bf16 (eager and torch.compile), inference
# throughput, and MFU against the matmul peak of each row's precision (bf16 on these GPUs), measured in the run.
#   bash benchmarks/gpu.sh [OUT_DIR] [gpu_bench.py options, e.g. --minilm-path DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/out}
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
timeout 420 python3 benchmarks/gpu_bench.py --json "$out/gpu.json" --markdown "$out/gpu.md" "$@"
