"""What checking a prepared dataset costs at every start (data.verify=true, the default): sha256 of every shard,
label array and file list, against reading the same bytes once (the least a pass over the data costs).

    python benchmarks/verify_prepared.py [--mb 512] [--shards 4]

Writes a synthetic prepared split (random uint8 images at 64x64 in `--shards` shards of about `--mb / shards` MB)
in a temp folder, then times (a) a plain read of every file and (b) `sources.check_split`, each three times
(best of three: the files sit in the page cache, so both measure the CPU, not the disk). Prints MB/s and the
time ImageNet-1k's prepared train split (251.9 GB at 256x256) would take at that rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_of  # noqa: E402

from ldae_cli.data.prepared import finish_split, npy_bytes  # noqa: E402
from ldae_cli.data.sources import check_split  # noqa: E402

IMAGENET_TRAIN_GB = 251.9


def write_split(folder: Path, total_mb: int, shards: int) -> dict:
    side = 64
    per_shard = max(1, total_mb * 2**20 // shards // (side * side * 3))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for k in range(shards):
        images = rng.integers(0, 256, (per_shard, side, side, 3), dtype=np.uint8)
        (folder / f"images-{k:05d}.npy").write_bytes(npy_bytes(images))
        (folder / f"labels-{k:05d}.npy").write_bytes(npy_bytes(rng.integers(0, 1000, per_shard).astype(np.int64)))
        (folder / f"files-{k:05d}.txt").write_text("".join(f"img{k}-{i}.jpg\n" for i in range(per_shard)))
        (folder / f"skipped-{k:05d}.txt").write_text("")
    return finish_split(folder, shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = write_split(root / "train", args.mb, args.shards)
        meta = {"stored_size": 64, "classes": [str(c) for c in range(1000)], "splits": {"train": info}}
        files = [root / "train" / name for name in info["file_sha256"]]
        size_mb = sum(f.stat().st_size for f in files) / 2**20

        def read_all():
            for f in files:
                with open(f, "rb") as handle:
                    while handle.read(1 << 22):
                        pass

        read_s = best_of(read_all)
        verify_s = best_of(lambda: check_split(root, "train", meta, verify=True))
    result = {
        "mb": round(size_mb, 1),
        "read_s": round(read_s, 3),
        "verify_s": round(verify_s, 3),
        "read_mb_per_s": round(size_mb / read_s),
        "verify_mb_per_s": round(size_mb / verify_s),
        "verify_vs_read": round(verify_s / read_s, 2),
        "imagenet_train_minutes": round(IMAGENET_TRAIN_GB * 1024 / (size_mb / verify_s) / 60, 1),
    }
    print(
        f"{size_mb:.0f} MB in {len(files)} files: read {read_s:.3f} s ({result['read_mb_per_s']} MB/s), verify "
        f"{verify_s:.3f} s ({result['verify_mb_per_s']} MB/s), {result['verify_vs_read']}x the read; ImageNet-1k "
        f"train prepared at 256x256 ({IMAGENET_TRAIN_GB} GB): about {result['imagenet_train_minutes']} min per "
        "start on one core (data.verify=false skips it)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
