#!/usr/bin/env bash
# One prepared GPU session (device tool): CUDA paths of the real CLI, then the pretrain-step benchmark.
# Runs from the repository root with the machine's own torch (no install): PYTHONPATH=. .
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

echo "== 1. CUDA path: pretrain (bf16 autocast, torch.compile, fused AdamW), interrupt, resume, export"
python3 - <<'PY'
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for c in range(2):
    d = Path(f"/tmp/imgs/train/c{c}"); d.mkdir(parents=True, exist_ok=True)
    for i in range(256):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
PY
SETS="--set data.source=imagefolder --set data.path=/tmp/imgs --set data.image_size=32 --set tokenizer.patch=4
 --set tokenizer.dim=16 --set tokenizer.fit_patches=20000 --set model.size=custom --set model.width=128
 --set model.encoder_depth=2 --set model.decoder_depth=2 --set model.num_heads=4 --set optim.batch_size=64
 --set optim.epochs=2 --set optim.warmup_epochs=0.5 --set optim.ema=0.999 --set run.log_every=2 --set run.progress=false"
time python3 -m ldae_cli pretrain --config final.yaml --out /tmp/run $SETS --set run.stop_after_steps=5 || echo "FAILED pretrain"
time python3 -m ldae_cli pretrain --resume /tmp/run || echo "FAILED resume"
python3 -m ldae_cli export --ckpt /tmp/run/checkpoint.safetensors --out /tmp/run/vit.safetensors || echo "FAILED export"
cp /tmp/run/metrics.jsonl "$OUT/gpu_cli_metrics.jsonl"

echo "== 2. pretrain step benchmark: half-L (DiT-L, 24 x 1024) at 256 tokens, bf16, compiled"
python3 benchmarks/pretrain_step.py --size half-L --image 256 --patch 16 --dim 32 --batch 256 --steps 10 --warmup 3 \
  --compile --json "$OUT/pretrain_step_halfL.json" || echo "FAILED benchmark"
