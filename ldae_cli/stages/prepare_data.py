"""`ldae prepare-data`: decode a dataset once into memory-mappable uint8 shards (see ldae_cli/data/prepared.py)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ldae_cli.config import load_config
from ldae_cli.data import prepared
from ldae_cli.data.discovery import check_splits, settle_data
from ldae_cli.data.pipeline import DataConfig, resolve_image_size
from ldae_cli.data.sources import PREPARED
from ldae_cli.errors import LdaeError
from ldae_cli.runs.logs import console
from ldae_cli.runs.rundir import RunLock


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    out: Optional[str] = None  # the prepared dataset's folder (required)
    splits: list[str] = field(default_factory=lambda: ["train", "eval"])  # data.train_split / data.eval_split
    # stored side = image_size x margin: 1 stores exactly what center-cropped training reads (bit for bit);
    # e.g. 1.15 keeps room for the random-resized crops of augmented training (finetune, probe)
    margin: float = 1.0
    shard_mb: float = 1024.0  # about this many MB of images per shard

    def validate(self) -> None:
        if self.margin < 1 or not self.shard_mb > 0:
            raise LdaeError(f"margin must be >= 1 and shard_mb > 0, got {self.margin} and {self.shard_mb}")
        if not self.splits or any(s not in ("train", "eval") for s in self.splits):
            raise LdaeError(f"splits: a list of 'train' and/or 'eval', got {self.splits}")


def main(config: str | None, overrides: list[str], flags: dict, force: bool = False, verify: str | None = None) -> Path:
    if verify is not None:
        checked, files = prepared.verify(Path(verify))
        console.print(
            f"{verify}: every file matches its recorded sha256: {PREPARED} and the {files} files it lists ("
            + ", ".join(f"{name}: {n:,} images" for name, n in checked.items())
            + ")"
        )
        return Path(verify)
    cfg = load_config(PrepareConfig, config, overrides, flags)
    if not cfg.out:
        raise LdaeError("prepare-data needs --out DIR, the folder to write the prepared dataset to")
    for note in settle_data(cfg.data) + resolve_image_size(cfg.data, 1):  # null: stored at the images' own size
        console.print(note)
    check_splits(cfg.data, [cfg.data.split_name(split) for split in cfg.splits])  # all there before any is written
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, "prepare-data")
    lock.acquire()
    try:
        prepared.prepare(cfg.data, cfg.splits, out, cfg.margin, cfg.shard_mb, force)
    except BaseException:
        if created and not any(out.rglob("images-*.npy")):  # a start that failed: the folder it made goes too
            lock.release()
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()
    return out
