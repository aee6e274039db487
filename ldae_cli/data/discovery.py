"""What a dataset location holds (`data.source: auto`): a prepared dataset, Fashion-MNIST IDX files, a
<split>/<class>/<image> tree or an archive of one, or a folder or archive of unlabelled images; a tree's splits and
its evaluation split; and the check that the splits a command reads are there before it reads or writes anything.
No stage has a default dataset: where nothing names the data, it stops (`NoData`) and asks for --data.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ldae_cli.data.sources import (
    DATA_CHOICES,
    EVAL_SPLITS,
    FMNIST_FILES,
    PREPARED,
    SourceConfig,
    is_image,
    read_prepared,
    resolve_path,
)
from ldae_cli.errors import LdaeError, short
from ldae_cli.settings.training import DataConfig

Kind = Literal["fashion-mnist", "cifar10", "imagefolder", "images"]  # what detection finds: a data.source but auto


@dataclass
class Detected:
    """What a dataset location holds: its source kind, a class tree's evaluation split, and what to tell the user."""

    source: Kind
    eval_split: Optional[str] = None
    notes: list[str] = field(default_factory=list)


class NoData(LdaeError):
    """Nothing names the data: no --data, no data.path or data.source in the config (a stage whose input may
    record its data says so in its own words)."""


def detect(path: str | None, train_split: str = "train") -> Detected:
    """data.source=auto: the kind of dataset at `path`; none is `NoData` (no stage assumes a dataset)."""
    if not path:
        raise NoData(
            f"nothing names the data: no --data, and the config sets neither data.path nor data.source; "
            f"give --data DIR: {DATA_CHOICES}"
        )
    root = Path(path).expanduser()
    if not root.exists():
        raise LdaeError(f"dataset not found: {path} does not exist; give --data PATH: {DATA_CHOICES}")
    if root.is_dir() and (root / PREPARED).is_file():
        meta = read_prepared(root)
        return Detected(
            meta.get("source") or "images",
            notes=[f"data: {root} is a prepared dataset (splits {', '.join(meta.get('splits', {}))})"],
        )
    if root.is_dir() and any((root / f"{FMNIST_FILES['train'][0]}{ext}").is_file() for ext in ("", ".gz")):
        return Detected("fashion-mnist", notes=[f"data: {root} holds Fashion-MNIST IDX files"])
    splits = tree_splits(root)
    if train_split in splits:
        found = [s for s in EVAL_SPLITS if s in splits]
        notes = [f"data: {root} is a <split>/<class>/<image> tree (splits {', '.join(sorted(splits))})"]
        if found:
            also = f" (also there: {', '.join(found[1:])}; --eval-split picks another)" if len(found) > 1 else ""
            notes.append(f"data: evaluation split '{found[0]}'{also}")
        else:
            notes.append(f"data: no evaluation split ({', '.join(EVAL_SPLITS)}); name one with --eval-split")
        return Detected("imagefolder", found[0] if found else None, notes)
    if root.is_file() and is_image(root.name) and not tarfile.is_tarfile(root):  # one image is no dataset to train on
        raise LdaeError(
            f"`{path}` is a single image; --data takes a folder of images, an image tree or an archive "
            "(.tar/.tar.gz): put it in a folder"
        )
    kind = "archive" if root.is_file() and tarfile.is_tarfile(root) else "folder" if root.is_dir() else "file"
    return Detected(
        "images",
        notes=[
            f"data: {root} is a {kind} of unlabelled images (no '{train_split}/<class>/' "
            "folders): training only; probes need labels, and 'evaluation' images are "
            "the training images"
        ],
    )


def tree_splits(root: Path) -> set[str]:
    """The split folders of a <split>/<class>/<image> tree (or archive), at its top or one level down."""
    if root.is_file():
        if not tarfile.is_tarfile(root):
            return set()
        try:
            with tarfile.open(root, "r:*") as tar:
                parts = [m.name.strip("/").split("/") for m in tar if m.isfile() and is_image(m.name)]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise LdaeError(f"{root}: cannot read archive ({short(exc)})") from None
        return {p[-3] for p in parts if len(p) >= 3 and len(p) <= 4}
    splits = set()
    for top in [root, *sorted(d for d in root.iterdir() if d.is_dir())]:
        for split_dir in (d for d in top.iterdir() if d.is_dir()):
            if any(
                c.is_dir() and any(is_image(f.name) for f in c.iterdir() if f.is_file()) for c in split_dir.iterdir()
            ):
                splits.add(split_dir.name)
    return splits


def eval_split_of(root: Path) -> Detected:
    """A class tree's evaluation split when data.eval_split is not set: the first of EVAL_SPLITS it has."""
    splits = tree_splits(root)
    found = [s for s in EVAL_SPLITS if s in splits]
    if not found:
        return Detected("imagefolder")
    also = f" (also there: {', '.join(found[1:])}; --eval-split picks another)" if len(found) > 1 else ""
    return Detected("imagefolder", found[0], [f"data: evaluation split '{found[0]}'{also}"])


def check_splits(cfg: SourceConfig, names: list[str]) -> None:
    """Each named split is there (without reading its images): what a command checks before it writes anything."""
    root = resolve_path(cfg)
    if root.is_dir() and (root / PREPARED).is_file():
        have = set(read_prepared(root).get("splits", {}))
    elif cfg.source == "fashion-mnist":
        have = {
            split
            for split, (images, _) in FMNIST_FILES.items()
            if any((root / f"{images}{ext}").is_file() for ext in ("", ".gz"))
        }
    elif cfg.source in ("cifar10", "imagefolder"):
        have = tree_splits(root)
    else:
        return  # a folder of images: every split is the same images
    missing = [n for n in names if n not in have]
    if missing:
        raise LdaeError(
            f"{root}: no '{missing[0]}' split (it has {', '.join(sorted(have)) or 'none'}); name the "
            "evaluation split with --eval-split (data.eval_split), or the training one with "
            "data.train_split"
        )


def settle_data(data: DataConfig) -> list[str]:
    """Settle what a new run reads, before any work: the source kind (auto), a class tree's evaluation split,
    DataLoader workers capped to the machine's cores. Returns what to tell the user."""
    notes = []
    if data.source == "auto":
        found = detect(data.path, data.train_split)
        data.source, notes = found.source, found.notes
        if data.eval_split is None:
            data.eval_split = found.eval_split
    elif data.source == "imagefolder" and data.eval_split is None:
        try:
            found = eval_split_of(resolve_path(data))
        except LdaeError:
            found = None  # a missing dataset is reported, with its fix, where it is opened
        if found is not None and found.eval_split is not None:
            data.eval_split, notes = found.eval_split, found.notes
    cores = os.cpu_count() or 1
    if data.num_workers > cores:
        notes.append(f"data: {data.num_workers} DataLoader workers capped to this machine's {cores} cores")
        data.num_workers = cores
    return notes
