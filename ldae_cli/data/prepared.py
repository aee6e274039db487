"""Prepared datasets: every image decoded, center-cropped and resized once (`ldae prepare-data`), stored as uint8
arrays that training reads through memory maps instead of decoding JPEGs every epoch.

Layout of a prepared dataset DIR:
    prepared.json                 settings, classes, per split: shards, image counts, each file's sha256;
                                  and index_sha256, the hash of its own content
    <split>/images-00000.npy ...  uint8 (n, S, S, 3) per shard, about `shard_mb` each
    <split>/labels-00000.npy ...  int64 (n,), and files-00000.txt: each image's source name
    <split>/labels.npy, files.txt the whole split's, written when the split is complete

Why .npy shards: the data layer's batch order is a seeded random permutation per epoch with exact resume at
any step, so every read is random access; a memory-mapped .npy gives that at the cost of one page fault per
image, with nothing to decode, no dependency, and a DDP rank or DataLoader worker touching only the images it
indexes. Streaming formats (webdataset, litdata, mosaic-streaming) read shards sequentially and shuffle
within a buffer, which breaks the seeded order and the step-exact resume every stage relies on.

A shard is complete when its images file exists (written last, atomically), so an interrupted preparation
continues at the first missing shard; unreadable images are an error or, with data.on_bad_image=skip, left
out and listed. The same source and settings give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from ldae_cli.data.pipeline import BadImageCounter, DataConfig, ImageDataset, make_loader
from ldae_cli.data.sources import (
    PREPARED,
    check_split,
    file_sha256,
    index_sha256,
    open_source,
    read_prepared,
    split_files,
)
from ldae_cli.errors import LdaeError
from ldae_cli.runs import rundir
from ldae_cli.runs.logs import console, note_kept, progress_bar
from ldae_cli.runs.rundir import remove_temp_files, write_atomically

FORMAT = 1


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def settings_of(cfg: DataConfig, stored: int, shard_mb: float) -> dict:
    """What a prepared dataset is: a different value means a different dataset (never silently mixed)."""
    return {
        "format": FORMAT,
        "source": cfg.source,
        "path": str(Path(cfg.path).resolve()) if cfg.path else None,
        "image_size": cfg.image_size,
        "stored_size": stored,
        "crop": "center",
        "shard_images": max(1, int(shard_mb * 2**20) // (stored * stored * 3)),
    }


def start(out: Path, settings: dict, force: bool) -> tuple[dict, rundir.Manifest]:
    """prepared.json for these settings, a new one or the one of an interrupted preparation to continue, and the
    folder's manifest. Other settings need --force, which starts again from a folder emptied of what ldae wrote."""
    path = out / PREPARED
    try:
        meta = read_prepared(out) if path.is_file() else None
    except LdaeError:
        if not force:
            raise
        meta = None  # an edited or damaged index: --force prepares the dataset again
    if meta is not None:
        manifest = rundir.Manifest.read(out) or rundir.Manifest.create(
            out, "prepare-data", {PREPARED, *(n for n in meta.get("splits", {}) if (out / n).is_dir())}
        )
        if {k: meta.get(k) for k in settings} == settings:
            return meta, manifest
        if not force:
            changed = [k for k in settings if meta.get(k) != settings[k]]
            raise LdaeError(
                f"{out} holds a dataset prepared with other settings ({', '.join(changed)}); pick another "
                "--out, or add --force to prepare it again"
            )
    manifest = rundir.claim(out, "prepare-data", force, replaces=("prepare-data",))
    return {**settings, "classes": None, "splits": {}}, manifest


def prepare_split(
    cfg: DataConfig, split: str, out: Path, meta: dict, progress: bool, manifest: rundir.Manifest
) -> dict:
    """Write the missing shards of one split, then its labels, file list and content hash."""
    source = open_source(cfg, split)
    name = cfg.split_name(split)
    manifest.add(name)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    remove_temp_files(folder)
    if meta["classes"] is None:
        meta["classes"] = source.classes
    elif source.classes != meta["classes"]:
        raise LdaeError(f"the '{name}' split has classes {source.classes[:5]}, the others {meta['classes'][:5]}")
    dataset = ImageDataset(source, meta["stored_size"], "center")
    per = meta["shard_images"]
    chunks = [list(range(s, min(s + per, len(dataset)))) for s in range(0, len(dataset), per)]
    bad = BadImageCounter(cfg.on_bad_image)
    with progress_bar("img", progress) as bar:
        task = bar.add_task(f"prepare {name}", total=len(dataset), info="")
        for k, chunk in enumerate(chunks):
            if (folder / f"images-{k:05d}.npy").exists():  # done by an earlier, interrupted preparation
                bar.update(task, advance=len(chunk))
                continue
            write_shard(dataset, chunk, folder, k, bad, cfg.num_workers)
            bar.update(task, advance=len(chunk))
            note_kept(
                f"shards 1-{k + 1} of {len(chunks)} of the '{name}' split in {out} (run the same command again "
                "to continue)"
            )
    return finish_split(folder, len(chunks))


def write_shard(
    dataset: ImageDataset, chunk: list[int], folder: Path, k: int, bad: BadImageCounter, workers: int
) -> None:
    images, labels, names, skipped = [], [], [], []
    pieces = [chunk[i : i + 256] for i in range(0, len(chunk), 256)]
    for keys, batch in zip(pieces, make_loader(dataset, pieces, workers)):
        bad.check(batch)
        lost = {b.name for b in batch.bad}
        skipped += sorted(lost)
        names += [dataset.name(i) for i in keys if dataset.name(i) not in lost]
        images.append(batch.images.permute(0, 2, 3, 1).numpy())
        labels.append(batch.labels.numpy())
    stored = dataset.size
    array = np.concatenate(images) if images else np.zeros((0, stored, stored, 3), np.uint8)
    write_atomically(folder / f"labels-{k:05d}.npy", npy_bytes(np.concatenate(labels).astype(np.int64)))
    write_atomically(folder / f"files-{k:05d}.txt", "".join(n + "\n" for n in names).encode())
    write_atomically(folder / f"skipped-{k:05d}.txt", "".join(n + "\n" for n in skipped).encode())
    write_atomically(folder / f"images-{k:05d}.npy", npy_bytes(np.ascontiguousarray(array, dtype=np.uint8)))


def write_index(out: Path, meta: dict) -> None:
    """prepared.json with the sha256 of its own content: an edited count, class list or hash is named."""
    meta["index_sha256"] = index_sha256(meta)
    write_atomically(out / PREPARED, (json.dumps(meta, indent=1) + "\n").encode())


def finish_split(folder: Path, count: int) -> dict:
    shards = split_files(count)[:count]
    counts, digest = [], hashlib.sha256()
    for shard in shards:
        digest.update(bytes.fromhex(file_sha256(folder / shard)))
        counts.append(int(np.load(folder / shard, mmap_mode="r").shape[0]))
    labels = np.concatenate([np.load(folder / f"labels-{k:05d}.npy") for k in range(count)]).astype(np.int64)
    files = "".join((folder / f"files-{k:05d}.txt").read_text() for k in range(count))
    skipped = [n for k in range(count) for n in (folder / f"skipped-{k:05d}.txt").read_text().splitlines()]
    digest.update(labels.tobytes())
    write_atomically(folder / "labels.npy", npy_bytes(labels))
    write_atomically(folder / "files.txt", files.encode())
    # every file a run reads, with its own hash: a changed byte is named by file when a run opens the split
    return {
        "complete": True,
        "images": int(sum(counts)),
        "shards": shards,
        "counts": counts,
        "skipped": skipped,
        "content_sha256": digest.hexdigest(),
        "file_sha256": {n: file_sha256(folder / n) for n in split_files(count)},
    }


def prepare(
    cfg: DataConfig, splits: list[str], out: Path, margin: float, shard_mb: float, force: bool, progress: bool = True
) -> dict:
    stored = max(cfg.settled_size, round(cfg.settled_size * margin))
    meta, manifest = start(out, settings_of(cfg, stored, shard_mb), force)
    manifest.add(PREPARED)
    for split in splits:
        name = cfg.split_name(split)
        if meta["splits"].get(name, {}).get("complete"):
            console.print(f"{name}: already prepared ({meta['splits'][name]['images']:,} images)")
            continue
        meta["splits"][name] = {"complete": False}
        write_index(out, meta)
        meta["splits"][name] = prepare_split(cfg, split, out, meta, progress, manifest)
        write_index(out, meta)
        info = meta["splits"][name]
        console.print(
            f"{name}: {info['images']:,} images at {stored}x{stored} in {len(info['shards'])} shard(s)"
            + (f", {len(info['skipped'])} unreadable skipped" if info["skipped"] else "")
        )
    return meta


def verify(out: Path, progress: bool = True) -> tuple[dict[str, int], int]:
    """`prepare-data --verify`: prepared.json against its own hash and its files, and every file of every split
    against its recorded sha256; the number of images per split and of files checked (none is an error)."""
    meta = read_prepared(out)
    if not meta["splits"]:
        raise LdaeError(f"{out / PREPARED}: lists no split, so nothing can be checked; prepare the dataset again")
    checked, files = {}, 0
    with progress_bar("split", progress) as bar:
        task = bar.add_task(f"verify {out}", total=len(meta["splits"]), info="")
        for name, info in meta["splits"].items():
            if not info.get("complete"):
                raise LdaeError(
                    f"{out}: the preparation of its '{name}' split was interrupted; run the same "
                    "`ldae prepare-data` command again to finish it"
                )
            check_split(out, name, meta, verify=True)
            checked[name], files = info["images"], files + len(info["file_sha256"])
            bar.update(task, advance=1)
    return checked, files
