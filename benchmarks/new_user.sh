#!/usr/bin/env bash
# Issue 32's commands as a new user would run them, against one checkout: $1 = a checkout (its ldae_cli is put on
# PYTHONPATH; e.g. a `git worktree` of an older commit), $2 = a scratch folder (emptied). Prints, per command:
# command | exit code | wall seconds | last line, and under it the lines that show what was decided.
#   bash benchmarks/new_user.sh "$PWD" /tmp/nu    (docs/new-user-before-after.txt: 71950d6 and this change)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd); PY=$REPO/.venv/bin/python
CODE=$1; W=$2; rm -rf "$W"; mkdir -p "$W"; cd "$W"
export PYTHONPATH=$CODE OMP_NUM_THREADS=1 COLUMNS=200 REPO
$PY - <<'PY'
import os, sys; sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
from pathlib import Path
from helpers import write_pattern_tree
import numpy as np
from PIL import Image
write_pattern_tree(Path("tree"), classes=tuple("abcdefghij"), per_class=15, size=64)
rng = np.random.default_rng(0)
Path("photos").mkdir()
for i, (w, h) in enumerate([(80, 60), (64, 64), (100, 70)] * 10):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f"photos/{i}.jpg")
Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save("img.jpg")
PY
TINY="--set model.size=custom --set model.width=32 --set model.encoder_depth=1 --set model.decoder_depth=1 --set model.num_heads=2 --set optim.batch_size=16 --set optim.epochs=1 --set optim.warmup_epochs=0.1 --set run.progress=false --set data.num_workers=0 --set tokenizer.fit_patches=2000"
run() {  # label, timeout, command...
  local label=$1 t=$2; shift 2
  local s=$(date +%s.%N)
  timeout "$t" "$PY" -m ldae_cli "$@" > out.txt 2>&1; local rc=$?
  local e=$(date +%s.%N)
  local last=$(grep -v '^\s*$' out.txt | tail -1 | cut -c1-230)
  printf '%s | %s | %.1f | %s\n' "$label" "$rc" "$(echo "$e - $s" | bc)" "$last"
}
run "fit-pca --patch 16 --dim 16 --data tree" 300 fit-pca --patch 16 --dim 16 --data tree --set pca.patches=20000
grep -o "image size[^;]*\|[0-9]* images from[^,]*\|D = [0-9]*" out.txt | head -3 | sed 's/^/    /'
run "pretrain --config final.yaml --set model.widht=3" 60 pretrain --config final.yaml --data tree --set model.widht=3
run "pretrain --config final.yaml --data tree --set optim.batch_size=64 --dry-run" 400 pretrain --config final.yaml --data tree --set optim.batch_size=64 --dry-run
grep -i "upsampl\|image size\|time " out.txt | head -3 | cut -c1-200 | sed 's/^/    /'
run "pretrain --data img.jpg (tiny)" 120 pretrain --config demo/cifar10.yaml --data img.jpg $TINY --out r-img
run "pretrain --config demo/cifar10.yaml --data tree (tiny)" 300 pretrain --config demo/cifar10.yaml --data tree $TINY
grep -o "runs/pretrain/[^ ]*" out.txt | head -1 | sed 's/^/    wrote under: /'
CK=$(ls runs/pretrain/*/checkpoint.safetensors | head -1)
run "same pretrain again" 120 pretrain --config demo/cifar10.yaml --data tree $TINY
run "probe --ckpt CK (no --config)" 300 probe --ckpt "$CK" --set run.progress=false --set data.num_workers=0
run "export --format timm" 120 export --ckpt "$CK" --out vit-timm --format timm
run "probe --ckpt vit-timm --config probe/small-fast.yaml (no --data)" 60 probe --ckpt vit-timm --config probe/small-fast.yaml --set run.progress=false
grep -i "^data\|fashion" out.txt | head -2 | cut -c1-200 | sed 's/^/    /'
run "study pixel-vs-latent --budget cpu --dry-run" 120 study pixel-vs-latent --budget cpu --dry-run --data tree
run "pretrain --data photos --budget 30m --print-config" 120 pretrain --data photos --budget 30m --print-config
grep "^#" out.txt | head -8 | cut -c1-160 | sed "s/^/    /"
