#!/usr/bin/env bash
# On one GPU (H100/H200): the `gpu` budget's pixel-vs-latent and pixel-dim studies on CIFAR-10 at its native 32x32
# (8x8 patches, and for pixel-dim also 16/4 and 8/2: always 16 tokens), one seed each; planned for under 10
# minutes of an H200 together (8 pretrains, 10 probes), not yet measured on one. Resumable: run it again and each
# study continues where it stopped (finished runs are checked and kept).
#   bash benchmarks/gpu_study.sh                       # both studies, one seed
#   SEEDS=3 bash benchmarks/gpu_study.sh pixel-dim     # one study, more seeds
# Data, all inside the checkout: the CIFAR-10 JPEG archive at $CIFAR, else .data/cifar10-jpg.tar.gz (for a device
# machine: `mkdir -p .data && cp ../shared/data/cifar10-jpg.tar.gz .data/`, and carry .data), else
# ../shared/data/. Runs go to $RUNS; each study's results.{json,md,png} and the times to $OUT (default $RUNS).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
RUNS=${RUNS:-runs/study-gpu}
OUT=${OUT:-$RUNS}
SEEDS=${SEEDS:-1}
STUDIES=${*:-pixel-vs-latent pixel-dim}
if [ -z "${CIFAR:-}" ]; then
    for candidate in .data/cifar10-jpg.tar.gz ../shared/data/cifar10-jpg.tar.gz; do
        if [ -f "$candidate" ]; then CIFAR=$candidate; break; fi
    done
fi
if [ -z "${CIFAR:-}" ] || [ ! -f "$CIFAR" ]; then
    echo "no CIFAR-10 archive: set CIFAR=/path/to/cifar10-jpg.tar.gz or put it in .data/" >&2
    exit 1
fi
mkdir -p "$RUNS" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
for study in $STUDIES; do
    start=$(date +%s)
    python3 -m ldae_cli study "$study" --budget gpu --seeds "$SEEDS" --source cifar10 --data "$CIFAR" \
        --out "$RUNS/$study"
    echo "$study ($SEEDS seed(s)): $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
    if [ "$OUT" != "$RUNS" ]; then
        mkdir -p "$OUT/$study"
        cp "$RUNS/$study"/results.json "$RUNS/$study"/results.md "$RUNS/$study"/results.png "$OUT/$study/"
    fi
done
