"""Data throughput per CPU core: how many images a second one core turns into the uint8 batches a pretrain step
reads (center crop, resized to --size), three ways, on the same COCO-sized JPEGs in one run:

  (a) PIL      the data layer's default path: PIL decode, crop, bicubic resize (in DataLoader workers)
  (b) tv       torchvision.io.decode_jpeg + crop + antialiased bicubic resize in torch (data.decode=gpu's
               path, here on the CPU)
  (c) prepared reading a dataset `ldae prepare-data` wrote: uint8 arrays through memory maps

and the cores an 8-GPU node needs for each at 918 img/s per H200 (benchmarks/pretrain_step.py, half-L at 256^2).

    python benchmarks/data_throughput.py                         # COCO mini from ../shared/data
    python benchmarks/data_throughput.py --images DIR --size 256 --seconds 10
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldae_cli.data import prepared  # noqa: E402
from ldae_cli.data.pipeline import DataConfig, ImageDataset, build_dataset, collate, decode_batch  # noqa: E402
from ldae_cli.data.sources import FileSource  # noqa: E402

NODE_IMG_S = 8 * 918  # eight H200 at the half-L step's measured rate


def coco_mini(work: Path) -> Path:
    """The COCO mini set's 80 train JPEGs as an ImageFolder tree (one class)."""
    archive = REPO.parent / "shared" / "data" / "coco-mini.tar.gz"
    if not archive.exists():
        sys.exit(f"{archive} not found; give --images DIR (a folder of JPEGs)")
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    tree = work / "tree" / "train" / "coco"
    tree.mkdir(parents=True)
    for jpg in sorted((work / "coco-mini").rglob("*train*/*.jpg")):
        (tree / jpg.name).symlink_to(jpg)
    return work / "tree"


def rate(fn, count: int, seconds: float) -> float:
    """Images a second of fn() (which handles `count` images), repeated for at least `seconds`."""
    fn()  # warm-up: file cache, lazy imports
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        done += count
    return done / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="an ImageFolder tree of JPEGs [default: COCO mini's 80 train]")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core for every path
    work = Path(tempfile.mkdtemp(prefix="ldae-data-"))
    tree = args.images or coco_mini(work)
    cfg = DataConfig(source="imagefolder", path=str(tree), image_size=args.size, num_workers=0, cache="never")
    pil = build_dataset(cfg, "train")
    files = pil.source
    assert isinstance(files, FileSource)
    n = len(pil)
    sizes = [p.stat().st_size for p in files.paths]
    print(f"{n} JPEGs, mean {sum(sizes) / n / 1024:.0f} KB, to {args.size}x{args.size} center crops; one core each")

    encoded = ImageDataset(files, args.size, "center", encoded=True)
    cpu = torch.device("cpu")
    prepared.prepare(cfg, ["train"], work / "prepared", 1.0, 1024, force=False, progress=False)
    ready = build_dataset(
        DataConfig(source="imagefolder", path=str(work / "prepared"), image_size=args.size, num_workers=0), "train"
    )
    batches = [list(range(i, min(i + 32, n))) for i in range(0, n, 32)]
    rates = {
        "(a) PIL decode + crop + resize": rate(
            lambda: [collate([pil[i] for i in b]) for b in batches], n, args.seconds
        ),
        "(b) torchvision decode_jpeg + resize": rate(
            lambda: [decode_batch(collate([encoded[i] for i in b]), args.size, cpu) for b in batches], n, args.seconds
        ),
        "(c) prepared (memory-mapped uint8)": rate(
            lambda: [collate([ready[i] for i in b]) for b in batches], n, args.seconds
        ),
    }
    base = rates["(a) PIL decode + crop + resize"]
    print(f"{'path':<40} {'img/s per core':>15} {'vs (a)':>8} {'cores for 8 x H200':>20}")
    for name, r in rates.items():
        print(f"{name:<40} {r:>15,.0f} {r / base:>7.1f}x {NODE_IMG_S / r:>20,.1f}")
    same = all(torch.equal(pil[i][0], ready[i][0]) for i in range(n))
    print(f"prepared images equal to the PIL path's, pixel for pixel: {same}; 8 x H200 need {NODE_IMG_S:,} img/s")


if __name__ == "__main__":
    main()
