#!/usr/bin/env bash
# On one GPU (H100/H200), one seed each unless SEEDS says more; resumable: run it again and each study continues
# where it stopped (finished runs are checked and kept).
#   bash benchmarks/gpu_study.sh                          # CIFAR-10 at 32/8 (D = 192): pixel-vs-latent, pixel-dim
#   bash benchmarks/gpu_study.sh tinyimagenet             # Tiny-ImageNet at 64/16 (D = 768): pixel-dim
#   SEEDS=3 bash benchmarks/gpu_study.sh cifar10 pixel-dim
#   DRY_RUN=1 bash benchmarks/gpu_study.sh tinyimagenet   # on any machine: the runs and their estimate, no GPU
#   JOBS=8 bash benchmarks/gpu_study.sh cifar10 pixel-vs-latent   # 8 GPUs, a run on each (ldae study --jobs 8);
#       against JOBS=1 into another RUNS: the wall-time ratio of a node (times.txt says how many ran at once)
#
# cifar10: the `gpu` budget (width 384, 6 + 6 blocks, bf16, 10 epochs of 512: 970 steps), 8 pretrains and 10
# probes, planned for under 10 minutes of an H200, not yet measured on one.
#
# tinyimagenet: the `gpu-64` budget, the same network on tinyimagenet-b100's 25,000 images at their native 64x64,
# pixel-dim's pairs 64/16, 32/8, 16/4 (D = 768, 192, 48; 16 tokens each): 6 pretrains of 960 steps of 512 and 6
# probes, planned for 12 minutes of one H100/H200 with the set-up. The plan: the `cpu-64` runs of the same study
# took 780 steps of 128 (100,000 images) at ~420 img/s on one core, 4-5 min each with their PCA fit; a GPU pretrain
# sees 491,520 images. At 16 tokens a step is bound by kernel launches, not by the 445.5 TFLOP/s the H200 reached
# at 256 tokens (docs/bench-pretrain-step-h200.json: 918 img/s of half-L, 485.6 GFLOP an image; this network is
# 2.11 GFLOP an image, which that rate would run at 211,000 img/s), so it is planned at the budget's 12,000 img/s:
# 41 s of steps + ~25 s of start, data and PCA fit a pretrain (6.7 min), 0.4 min a probe (2.4 min), set-up and
# data check ~1 min: about 10 min, 2 min to spare. The study prints its measured estimate after every run; its
# timings.json has each run's seconds.
#
# Data, all inside the checkout: the archive at $CIFAR or $TINY, else .data/<archive> (for a device machine: `mkdir
# -p .data && cp ../shared/data/<archive> .data/`, and carry .data), else ../shared/data/. Runs go to $RUNS; each
# study's results.{json,md,png} and the times to $OUT (default $RUNS).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}  # the one with ldae's packages (the device machine's own)
DATASET=cifar10
case "${1:-}" in cifar10|tinyimagenet) DATASET=$1; shift ;; esac
if [ "$DATASET" = tinyimagenet ]; then
    ARCHIVE=tinyimagenet-b100.tar.gz BUDGET=gpu-64 DATA=${TINY:-} SOURCE=() DEFAULT_STUDIES=pixel-dim
else
    ARCHIVE=cifar10-jpg.tar.gz BUDGET=gpu DATA=${CIFAR:-} SOURCE=(--source cifar10)
    DEFAULT_STUDIES="pixel-vs-latent pixel-dim"
fi
RUNS=${RUNS:-runs/study-$BUDGET}
OUT=${OUT:-$RUNS}
SEEDS=${SEEDS:-1}
JOBS=${JOBS:-1}
STUDIES=${*:-$DEFAULT_STUDIES}
if [ -z "$DATA" ]; then
    for candidate in ".data/$ARCHIVE" "../shared/data/$ARCHIVE"; do
        if [ -f "$candidate" ]; then DATA=$candidate; break; fi
    done
fi
if [ -z "$DATA" ] || [ ! -f "$DATA" ]; then
    echo "no $ARCHIVE: set CIFAR= or TINY=/path/to/$ARCHIVE, or put it in .data/" >&2
    exit 1
fi
if [ -n "${DRY_RUN:-}" ]; then
    for study in $STUDIES; do
        "$PYTHON" -m ldae_cli study "$study" --budget "$BUDGET" --seeds "$SEEDS" "${SOURCE[@]}" --data "$DATA" \
            --out "$RUNS/$study" --pretrains "$RUNS/pretrain" --jobs "$JOBS" --dry-run
    done
    exit 0
fi
mkdir -p "$RUNS" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
for study in $STUDIES; do
    start=$(date +%s)
    "$PYTHON" -m ldae_cli study "$study" --budget "$BUDGET" --seeds "$SEEDS" "${SOURCE[@]}" --data "$DATA" \
        --out "$RUNS/$study" --pretrains "$RUNS/pretrain" --jobs "$JOBS"
    echo "$study on $DATASET ($SEEDS seed(s), $JOBS at once): $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
    if [ "$OUT" != "$RUNS" ]; then
        mkdir -p "$OUT/$study"
        cp "$RUNS/$study"/results.json "$RUNS/$study"/results.md "$RUNS/$study"/results.png "$OUT/$study/"
    fi
done
