#!/usr/bin/env bash
# Prepared runs for a lent GPU machine (the device tool): the speed benchmark with a ViT-B/16 at
# 224 px and K = 6 deep prompts, bf16 autocast on CUDA. Writes JSON to $OUT (device tool) or bench/results/.
#   device run: bash bench/gpu_check.sh      (timeout_s ~ 540; nothing is downloaded: random ViT-B weights)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, timm, safetensors" 2>/dev/null || python3 -m pip install -q -r requirements.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
timeout 500 python3 bench/speed.py --backbone vit_base_patch16_224 --img-size 224 --deep --tokens 10 \
  --device cuda --sources 6 2 4 8 16 --samples 32 64 128 --repeat 5 --no-maps \
  --out "$OUT_DIR/speed-cuda-vitb16-deep-k6.json" 2>&1 | tee "$OUT_DIR/gpu_check.log"
# The quality benchmark's --full profile on the GPU (Ray, four jobs share the GPU). It is resumable: rerun the script
# (with bench/results/tmp/quality-full carried) to go on from the jobs already finished.
timeout 540 python3 bench/quality.py --full --gpus-per-job 0.25 --store bench/results/tmp/quality-full \
  --out "$OUT_DIR/quality-full-cuda.json" 2>&1 | tail -40 | tee "$OUT_DIR/quality_full.log" || true
