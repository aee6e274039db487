#!/usr/bin/env bash
# CUDA smoke test of the stages beyond pretrain (device tool; the machine's own torch, PYTHONPATH=.):
# probe (fast and full protocol), denoise, train-tokenizer (patch AE, conv VAE) and a pretrain on the
# trained tokenizer, on tiny synthetic images. Prints FAILED lines for anything that breaks.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 - <<'PY'
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:32, 0:32] / 32
for split in ("train", "val"):
    for c in range(2):
        d = Path(f"/tmp/imgs/{split}/c{c}"); d.mkdir(parents=True, exist_ok=True)
        for i in range(128):
            img = np.stack([np.sin((2 + 3 * c) * 6.28 * (xx if k % 2 else yy) + rng.uniform(0, 6.28)) for k in range(3)], -1)
            Image.fromarray(((img * 0.4 + 0.5).clip(0, 1) * 255).astype(np.uint8)).save(d / f"{i}.png")
PY
L="python3 -m ldae_cli"
D="--set data.source=imagefolder --set data.path=/tmp/imgs --set data.image_size=32 --set run.progress=false"
M="--set model.size=custom --set model.width=64 --set model.encoder_depth=2 --set model.decoder_depth=2 --set model.num_heads=4"
$L pretrain --config final.yaml --out /tmp/pre $D $M --set tokenizer.patch=4 --set tokenizer.dim=8 \
  --set tokenizer.fit_patches=20000 --set optim.batch_size=64 --set optim.epochs=3 || echo "FAILED pretrain"
$L probe --ckpt /tmp/pre/checkpoint.safetensors --config probe/small-fast.yaml --out /tmp/probe-fast \
  --set probe.batch_size=64 --set run.progress=false || echo "FAILED probe fast"
$L probe --ckpt /tmp/pre/checkpoint.safetensors --out /tmp/probe-full --set probe.batch_size=64 --set probe.epochs=2 \
  --set probe.warmup_epochs=1 --set probe.extract_batch=32 --noisy --set run.progress=false || echo "FAILED probe full"
$L probe --ckpt /tmp/pre/checkpoint.safetensors --config probe/small-fast.yaml --random-init --out /tmp/probe-rand \
  --set probe.batch_size=64 --set run.progress=false || echo "FAILED probe random-init"
$L denoise /tmp/imgs/val/c0 --ckpt /tmp/pre/checkpoint.safetensors --out /tmp/dn --compare-pixel-noise --samples 64 \
  || echo "FAILED denoise"
T="--set data.eval_split=val --set report.images=32 --set report.stats_images=64 --set report.pca_patches=20000"
$L train-tokenizer --config tokenizer/cifar10-patch-ae --out /tmp/tok-ae $D $T --set tokenizer.dim=8 \
  --set optim.epochs=2 --set optim.batch_size=64 || echo "FAILED train-tokenizer patch-ae"
$L train-tokenizer --config tokenizer/cifar10-conv-vae --out /tmp/tok-vae $D $T --set optim.epochs=2 \
  --set optim.batch_size=16 || echo "FAILED train-tokenizer conv-vae"
$L pretrain --config trajectory/T1.5.yaml --out /tmp/pre-vae $D $M --set tokenizer.path=/tmp/tok-vae/checkpoint.safetensors \
  --set tokenizer.patch=4 --set optim.batch_size=64 --set optim.epochs=1 || echo "FAILED pretrain on conv VAE"
$L probe --ckpt /tmp/pre-vae/checkpoint.safetensors --config probe/small-fast.yaml --out /tmp/probe-vae \
  --set probe.batch_size=64 --set run.progress=false || echo "FAILED probe conv VAE"
echo "smoke done"
