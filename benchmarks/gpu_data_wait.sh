#!/usr/bin/env bash
# On a GPU machine: the share of step time the half-L pretrain at 256x256 waits for data, (1) from a prepared
# dataset on local disk, (2) from raw JPEGs decoded on the GPU (data.decode=gpu), each one short run.
# CIFAR-10 (beside the checkout) stands in for ImageNet: upsampled to 256 when prepared; its JPEGs are 32x32, so
# (2) measures nvjpeg's per-image overhead on small files, a lower bound of the decode cost of ImageNet's.
#   bash benchmarks/gpu_data_wait.sh      (about 6 minutes on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ldae-data-wait}
CIFAR=../shared/data/cifar10-jpg.tar.gz
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
time python3 -m ldae_cli prepare-data --source cifar10 --data $CIFAR --image-size 256 --workers 16 \
    --set splits=[train] --out "$OUT/prepared" --force
SETS="--set model.size=half-L --set optim.batch_size=256 --set run.stop_after_steps=60 --set run.log_every=10
      --set online_probe.enabled=false --set data.num_workers=12 --set run.compile=true --set tokenizer.fit_patches=200000"
python3 -m ldae_cli pretrain --config final.yaml --source cifar10 --data "$OUT/prepared" --out "$OUT/from-prepared" \
    --force $SETS
python3 -m ldae_cli pretrain --config final.yaml --source cifar10 --data $CIFAR --out "$OUT/gpu-decode" --force \
    $SETS --set data.decode=gpu --set data.cache=never
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for run in ("from-prepared", "gpu-decode"):
    rows = [json.loads(x) for x in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("data_wait") is not None][1:]  # the first interval holds the loader's start
    wait = sum(r["data_wait"] for r in rows) / len(rows)
    print(f"{run:>14}: data wait {100 * wait:.1f}% of step time, {rows[-1]['img_per_s']:.0f} img/s")
PY
