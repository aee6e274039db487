#!/usr/bin/env bash
# On one GPU (H100/H200): the `gpu` budget of the pixel-vs-latent and latent-dim studies on CIFAR-10
# upsampled to 64x64 with 8x8 patches (D = 192), each study one command of about 6 and 11 minutes.
#   bash benchmarks/gpu_study.sh pixel-vs-latent     # l-DAE, pixel DAE, random init, raw pixels
#   bash benchmarks/gpu_study.sh latent-dim          # d = 8 .. 128
# Results (results.md, results.png, results.json) land in $OUT/<study>/; the GPU's name in $OUT/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${1:-pixel-vs-latent}
OUT=${OUT:-runs/study-gpu}
SEEDS=${SEEDS:-1}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
time python3 -m ldae_cli study "$STUDY" --budget gpu --seeds "$SEEDS" --source cifar10 \
    --data ../shared/data/cifar10-jpg.tar.gz --out "$OUT/$STUDY"
