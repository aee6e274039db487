"""The plans `ldae study --dry-run` prints for machines this one is not, written to a text file:

(a) an 8-GPU node (torch.cuda.device_count patched to 8, CUDA_VISIBLE_DEVICES unset):
    ldae study pixel-vs-latent --budget gpu --jobs 8 --seeds 3 --source cifar10 --dry-run
(b) a 64-job SLURM study (baselines at the paper budget, 8 seeds: 24 pretrains + 40 probes) on a synthetic folder of
    4,200 random 256-px images in 2 classes (MoCo v3's paper batch of 4,096 needs that many):
    ldae study baselines --budget paper --seeds 8 --data DIR --nproc 8 --launch slurm --partition gpu --time 1440
        --dry-run

Nothing is trained or submitted; the study folders are temporary.

    python benchmarks/study_plans.py > docs/study-plans.txt
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldae_cli import cli  # noqa: E402


def plan(argv: list[str]) -> str:
    out = io.StringIO()
    sys.argv = ["ldae", *argv]
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main()
    return out.getvalue()


def image_folder(root: Path, per_class: int = 2100, size: int = 256) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 50)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def main() -> None:
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        real = torch.cuda.device_count
        torch.cuda.device_count = lambda: 8  # type: ignore[assignment]
        node = ["study", "pixel-vs-latent", "--budget", "gpu", "--jobs", "8", "--seeds", "3", "--source", "cifar10"]
        print(f"# (a) 8 GPUs (torch.cuda.device_count patched to 8): ldae {' '.join(node)} --dry-run")
        print(plan([*node, "--dry-run"]).replace(tmp, "."))
        torch.cuda.device_count = real  # type: ignore[assignment]
        data = image_folder(Path(tmp) / "photos256")
        slurm = ["study", "baselines", "--budget", "paper", "--seeds", "8", "--data", str(data), "--nproc", "8"]
        slurm += ["--launch", "slurm", "--partition", "gpu", "--time", "1440"]
        print(f"# (b) 64 SLURM jobs: ldae {' '.join(slurm).replace(tmp, '.')} --dry-run")
        print(plan([*slurm, "--dry-run"]).replace(tmp, "."))


if __name__ == "__main__":
    main()
