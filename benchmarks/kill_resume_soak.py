"""Kill-and-resume soak: SIGKILL a short pretrain run at random moments, resume it each time, and compare its
final checkpoint with an uninterrupted run of the same config, tensor by tensor, bit for bit.

    python benchmarks/kill_resume_soak.py               # 10 kills, about 4 minutes on 2 CPU cores
    python benchmarks/kill_resume_soak.py --kills 30 --seed 1

A kill before the run's first checkpoint leaves nothing to resume: that restart is a new run (--force
replaces what the killed start left). Kills land anywhere: during start-up, data loading, a step, a
checkpoint write (every second kill waits for a save's temp file to appear and kills on sight; a temp file
left behind says it landed mid-write, and the next start must remove it).
The soak fails if any tensor differs, a temp file or lock survives, or a restart exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ldae_cli.runs.checkpoint import read_metadata  # noqa: E402


def write_images(root: Path, per_class: int = 16, size: int = 32) -> Path:
    """Two classes of striped 32x32 images (the test suite's pattern tree, larger)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for ci, cls in enumerate(("a", "b")):
        d = root / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            phase = rng.uniform(0, 6.28, 3)
            img = np.stack([np.sin((2 + 3 * ci) * 6.28 * (xx if c % 2 else yy) + phase[c]) for c in range(3)], -1)
            Image.fromarray(((img * 0.4 + 0.5).clip(0, 1) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def pretrain_args(data: Path, out: Path, pca: Path) -> list[str]:
    sets = {
        "data.source": "imagefolder",
        "data.path": data,
        "data.image_size": 32,
        "data.num_workers": 0,
        "tokenizer.patch": 4,
        "tokenizer.dim": 8,
        "tokenizer.path": pca,
        "model.size": "custom",
        "model.width": 64,
        "model.encoder_depth": 2,
        "model.decoder_depth": 2,
        "model.num_heads": 4,
        "optim.batch_size": 8,
        "optim.epochs": 15,
        "optim.warmup_epochs": 1,
        "optim.ema": 0.99,
        "run.out_dir": out,
        "run.save_every": 1,
        "run.log_every": 1,
        "run.progress": False,
        "run.device": "cpu",
    }
    return ["pretrain", "--config", "final.yaml", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def ldae(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ldae_cli", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"a run exited {proc.returncode}: {err.strip()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-delay",
        type=float,
        default=12.0,
        help="seconds after a start: kills land uniformly in [1, this); a start takes about 4",
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ldae-soak-"))
    data = write_images(work / "images")
    pca = work / "pca.safetensors"
    finish(
        ldae(
            "fit-pca",
            "--source",
            "imagefolder",
            "--data",
            data,
            "--patch",
            "4",
            "--dim",
            "8",
            "--patches",
            "20000",
            "--image-size",
            "32",
            "--out",
            pca,
            "--set",
            "data.num_workers=0",
        )
    )
    started = time.time()
    finish(ldae(*pretrain_args(data, work / "whole", pca)))
    whole_s = time.time() - started
    run = work / "killed"
    print(f"uninterrupted run: {whole_s:.1f} s; now {args.kills} SIGKILLs at random moments of the same run")
    print(f"{'kill':>4}  {'after s':>7}  {'checkpoint step':>15}  {'temp file at kill':>17}  restart")
    started = time.time()
    for k in range(1, args.kills + 1):
        resumable = (run / "checkpoint.safetensors").exists()
        left = {p.name for p in run.glob(".*.tmp")}  # a killed save's, removed by this start
        proc = ldae("pretrain", "--resume", run) if resumable else ldae(*pretrain_args(data, run, pca), "--force")
        delay = rng.uniform(1, args.max_delay)
        if k % 2:
            time.sleep(delay)
        else:  # aim at a checkpoint write: kill the moment its temp file shows up
            delay = time.time() + args.max_delay
            while time.time() < delay and not any(
                e.name.endswith(".tmp") and e.name not in left for e in os.scandir(run)
            ):
                pass
            delay = args.max_delay - (delay - time.time())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        temp = bool(list(run.glob(".*.tmp")))
        step = (
            read_metadata(run / "checkpoint.safetensors")["extra"]["step"]
            if (run / "checkpoint.safetensors").exists()
            else "-"
        )
        print(
            f"{k:>4}  {delay:>7.2f}  {step!s:>15}  {'yes' if temp else 'no':>17}  "
            f"{'--resume' if resumable else 'new run'}"
        )
    resumable = (run / "checkpoint.safetensors").exists()
    finish(ldae("pretrain", "--resume", run) if resumable else ldae(*pretrain_args(data, run, pca), "--force"))
    a, b = load_file(work / "whole" / "checkpoint.safetensors"), load_file(run / "checkpoint.safetensors")
    differing = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    litter = [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == ".ldae.lock"]
    print(
        f"killed run finished after {time.time() - started:.1f} s; {len(a)} tensors compared "
        f"(model, ema, optimizer state): {len(differing)} differ; temp files or locks left: {litter or 'none'}"
    )
    if differing or litter or a.keys() != b.keys():
        sys.exit(f"FAILED: differing tensors {differing[:5]}, litter {litter}")
    print("PASSED: bit-equal to the uninterrupted run")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
