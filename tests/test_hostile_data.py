"""Reliability matrix, hostile data: an edited or damaged prepared dataset (its index or its files) and links or
archive members that lead outside --data, each refused or skipped in one line before any image is read."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line, pretrain_args, snapshot, unchanged

from ldae_cli.config import load_config
from ldae_cli.data import prepared
from ldae_cli.data.discovery import settle_data
from ldae_cli.data.pipeline import DataConfig
from ldae_cli.data.sources import file_sha256, index_sha256

T = "splits.train"
FILES = 2 * (6 * 3 + 2)  # per split: 6 shards of 3 images (images, labels, files), labels.npy and files.txt


@pytest.fixture(scope="module")
def ready(world, tmp_path_factory) -> Path:
    """world.images (2 classes, 16 train and 16 val images) prepared at 32x32, 3 images a shard."""
    cfg = load_config(
        DataConfig, None, [f"path={world.images}", "source=imagefolder", "num_workers=0", "image_size=32"]
    )
    settle_data(cfg)
    out = tmp_path_factory.mktemp("hostile") / "ready"
    out.mkdir()
    prepared.prepare(cfg, ["train", "eval"], out, 1.0, 0.01, False, progress=False)
    return out


def index_edit(change, seal: str = "left"):
    """An edit of prepared.json; `seal`: left (its index_sha256 as it was: a hand edit), seal (recomputed, as a
    tool that rewrites the index would) or legacy (removed: a dataset prepared before the index had a hash)."""

    def apply(root: Path) -> None:
        meta = json.loads((root / "prepared.json").read_text())
        change(meta, meta["splits"]["train"])
        if seal == "seal":
            meta["index_sha256"] = index_sha256(meta)
        elif seal == "legacy":
            meta.pop("index_sha256")
        (root / "prepared.json").write_text(json.dumps(meta, indent=1))

    return apply


def flip_byte(root: Path) -> None:
    shard = root / "train" / "images-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0x10
    shard.write_bytes(bytes(raw))


def labels_beyond_classes(root: Path) -> None:
    """labels.npy holding a label 5 for 2 classes, with every hash recomputed to match."""
    labels = np.load(root / "train" / "labels.npy")
    labels[3] = 5
    np.save(root / "train" / "labels.npy", labels)
    index_edit(
        lambda m, t: t["file_sha256"].update({"labels.npy": file_sha256(root / "train" / "labels.npy")}), "seal"
    )(root)


def extra_shard(t: dict, hashed: bool) -> None:
    t["shards"].append("images-00006.npy")
    t["counts"].append(3)
    t["images"] += 3
    if hashed:
        t["file_sha256"].update({n: "0" * 64 for n in ("images-00006.npy", "labels-00006.npy", "files-00006.txt")})


EDITED = "prepared.json: its content differs from its index_sha256"
HOSTILE = [  # id, edit, what --verify and opening the dataset for training both say
    ("file_sha256-emptied", index_edit(lambda m, t: t.update(file_sha256={})), [EDITED]),
    ("file_sha256-removed", index_edit(lambda m, t: t.pop("file_sha256")), [EDITED]),
    ("shard-hash-edited", index_edit(lambda m, t: t["file_sha256"].update({"images-00001.npy": "0" * 64})), [EDITED]),
    ("counts-edited", index_edit(lambda m, t: t.update(counts=[30, 3, 3, 3, 3, 1], images=43)), [EDITED]),
    ("classes-cut", index_edit(lambda m, t: m.update(classes=["a"])), [EDITED]),
    ("index-hash-edited", index_edit(lambda m, t: m.update(index_sha256="0" * 64)), [EDITED]),
    # the index has no hash (an earlier version's) or a recomputed one: its content is checked against the files
    (
        "legacy-file_sha256-emptied",
        index_edit(lambda m, t: t.update(file_sha256={}), "legacy"),
        [f"prepared.json: {T}.file_sha256 must hold the sha256 of each of the split's 20 files"],
    ),
    (
        "legacy-file_sha256-removed",
        index_edit(lambda m, t: t.pop("file_sha256"), "legacy"),
        [f"prepared.json: {T}.file_sha256 must hold", "missing, empty"],
    ),
    (
        "sealed-shard-hash-edited",
        index_edit(lambda m, t: t["file_sha256"].update({"images-00001.npy": "0" * 64}), "seal"),
        ["train/images-00001.npy: its sha256 differs"],
    ),
    (
        "sealed-counts-edited",
        index_edit(lambda m, t: t.update(counts=[30, 3, 3, 3, 3, 1], images=43), "seal"),
        [
            f"prepared.json: {T}.counts and stored_size say 30 images of 32x32, but",
            "images-00000.npy holds uint8 (3, 32, 32, 3)",
        ],
    ),
    (
        "sealed-images-edited",
        index_edit(lambda m, t: t.update(images=17), "seal"),
        [f"prepared.json: {T}.images is 17, but its counts add up to 16"],
    ),
    (
        "sealed-classes-cut",
        index_edit(lambda m, t: m.update(classes=["a"]), "seal"),
        ["prepared.json: classes holds 1 class(es), but", "train/labels.npy holds labels 0 to 1"],
    ),
    (
        "labels-out-of-range",
        labels_beyond_classes,
        ["prepared.json: classes holds 2 class(es), but", "train/labels.npy holds labels 0 to 5"],
    ),
    (
        "sealed-counts-strings",
        index_edit(lambda m, t: t.update(counts=["3"] * 6), "seal"),
        [f"prepared.json: {T}.counts must hold 6 image counts, one per shard"],
    ),
    (
        "sealed-count-negative",
        index_edit(lambda m, t: t.update(counts=[3, 3, 3, 3, 5, -1]), "seal"),
        [f"prepared.json: {T}.counts must hold 6 image counts"],
    ),
    (
        "sealed-images-negative",
        index_edit(lambda m, t: t.update(images=-16), "seal"),
        [f"prepared.json: {T}.images is -16"],
    ),
    (
        "sealed-stored_size-edited",
        index_edit(lambda m, t: m.update(stored_size=16), "seal"),
        [f"{T}.counts and stored_size say 3 images of 16x16", "holds uint8 (3, 32, 32, 3)"],
    ),
    (
        "sealed-stored_size-string",
        index_edit(lambda m, t: m.update(stored_size="32"), "seal"),
        ["prepared.json: stored_size must be an image side in pixels, not '32'"],
    ),
    (
        "sealed-extra-shard-listed",
        index_edit(lambda m, t: extra_shard(t, hashed=False), "seal"),
        [f"{T}.file_sha256 must hold the sha256 of each of the split's 23 files"],
    ),
    (
        "sealed-extra-shard-hashed",
        index_edit(lambda m, t: extra_shard(t, hashed=True), "seal"),
        ["train/images-00006.npy: missing from the prepared dataset"],
    ),
    (
        "sealed-shard-outside",
        index_edit(lambda m, t: t["shards"].__setitem__(0, "../../outside.npy"), "seal"),
        [f"prepared.json: {T}.shards must list images-00000.npy, images-00001.npy"],
    ),
    (
        "sealed-split-outside",
        index_edit(lambda m, t: m["splits"].update({"../../x": t}), "seal"),
        ["prepared.json: 'splits' must map split folder names"],
    ),
    (
        "not-an-object",
        lambda root: (root / "prepared.json").write_text("[]"),
        ["prepared.json: 'splits' must map split folder names"],
    ),
    ("flipped-byte", flip_byte, ["train/images-00001.npy: its sha256 differs from the one recorded"]),
    (
        "missing-shard",
        lambda root: (root / "train" / "images-00002.npy").unlink(),
        ["train/images-00002.npy: missing from the prepared dataset"],
    ),
]


@pytest.mark.parametrize("edit,fragments", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_an_edited_or_damaged_prepared_dataset_is_refused_by_verify_and_by_training(
    edit, fragments, ready, world, run_main, tmp_path
):
    data = shutil.copytree(ready, tmp_path / "data")
    edit(data)
    before = snapshot(data, world.root)
    one_line(run_main("prepare-data", "--verify", str(data)), 1, *fragments)
    one_line(run_main(*pretrain_args(world, tmp_path / "run", **{"data.path": data})), 1, *fragments)
    assert not (tmp_path / "run").exists()
    unchanged(before)


@pytest.mark.parametrize("case", ["sealed-counts-edited", "sealed-classes-cut", "missing-shard"])
def test_data_verify_false_skips_the_hashes_but_never_the_counts_and_classes(case, ready, world, run_main, tmp_path):
    edit = next(c[1] for c in HOSTILE if c[0] == case)
    data = shutil.copytree(ready, tmp_path / "data")
    edit(data)
    before = snapshot(data, world.root)
    fragment = {
        "sealed-counts-edited": "say 30 images of 32x32",
        "sealed-classes-cut": "classes holds 1 class(es)",
        "missing-shard": "images-00002.npy: missing or unreadable",
    }[case]
    res = run_main(*pretrain_args(world, tmp_path / "run", **{"data.path": data, "data.verify": "false"}))
    one_line(res, 1, fragment)
    assert not (tmp_path / "run").exists()
    unchanged(before)


@pytest.mark.parametrize("seal", ["as-prepared", "legacy"])
def test_verify_says_how_many_files_it_checked_and_reads_an_index_without_a_hash(
    seal, ready, world, run_main, tmp_path
):
    data = shutil.copytree(ready, tmp_path / "data")
    if seal == "legacy":  # prepared by the version before the index had its own hash: still read, fully checked
        index_edit(lambda m, t: None, "legacy")(data)
    before = snapshot(data)
    res = run_main("prepare-data", "--verify", str(data))
    assert res.returncode == 0, res.stderr
    assert (
        f"every file matches its recorded sha256: prepared.json and the {FILES} files it lists (train: 16 "
        "images, val: 16 images)" in res.stdout
    )
    unchanged(before)


def test_an_edited_index_is_prepared_again_only_with_force(ready, world, run_main, tmp_path):
    data = shutil.copytree(ready, tmp_path / "data")
    index_edit(lambda m, t: t.update(images=17))(data)
    args = [
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(world.images),
        "--image-size",
        "32",
        "--out",
        str(data),
        "--set",
        "data.num_workers=0",
        "--set",
        "shard_mb=0.01",
    ]
    before = snapshot(data)
    one_line(run_main(*args), 1, EDITED, "--force")
    unchanged(before)
    assert run_main(*args, "--force").returncode == 0
    assert run_main("prepare-data", "--verify", str(data)).returncode == 0


# ------------------------------------------------------------------------------------------ links out of --data


def secret(folder: Path) -> Path:
    """A file outside --data named like an image; not an image, so reading it would fail the preparation."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret.png").write_bytes(b"outside the dataset")
    return folder / "secret.png"


def file_link_out(tree: Path, outside: Path) -> None:
    (tree / "train" / "a" / "zz.png").symlink_to(secret(outside))


def class_link_out(tree: Path, outside: Path) -> None:
    secret(outside / "c")
    (tree / "train" / "c").symlink_to(outside / "c", target_is_directory=True)


def links_inside(tree: Path, outside: Path) -> None:
    (tree / "train" / "b" / "zz.png").symlink_to(Path("..") / "a" / "0.png")
    for split in ("train", "val"):  # every split has the same classes
        (tree / split / "c").symlink_to("a", target_is_directory=True)


LINKS = [  # id, links added to a copy of world.images, the note printed, train images and classes prepared
    (
        "file-link-outside",
        file_link_out,
        "data: 1 link(s) in {tree}/train lead outside {tree} and were skipped",
        16,
        ["a", "b"],
    ),
    ("class-link-outside", class_link_out, "data: 1 link(s) in {tree}/train lead outside {tree}", 16, ["a", "b"]),
    ("links-inside", links_inside, None, 25, ["a", "b", "c"]),
]


@pytest.mark.parametrize("link,note,images,classes", [c[1:] for c in LINKS], ids=[c[0] for c in LINKS])
def test_a_link_out_of_the_data_folder_is_skipped_and_counted(link, note, images, classes, world, run_main, tmp_path):
    tree = shutil.copytree(world.images, tmp_path / "tree")
    link(tree, tmp_path / "outside")
    before = snapshot(tree, tmp_path / "outside") if (tmp_path / "outside").exists() else snapshot(tree)
    res = run_main(
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(tree),
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "out"),
        "--set",
        "data.num_workers=0",
    )
    assert res.returncode == 0, res.stderr  # the secret is no image: had it been read, this would be an error
    if note:
        assert note.format(tree=tree) in res.stdout
    else:
        assert "lead outside" not in res.stdout
    meta = json.loads((tmp_path / "out" / "prepared.json").read_text())
    assert meta["splits"]["train"]["images"] == images and meta["classes"] == classes
    unchanged(before)


def test_a_split_folder_linked_out_of_the_data_folder_reads_nothing(world, run_main, tmp_path):
    tree = shutil.copytree(world.images, tmp_path / "tree")
    secret(tmp_path / "outside" / "train" / "a")
    shutil.rmtree(tree / "train")
    (tree / "train").symlink_to(tmp_path / "outside" / "train", target_is_directory=True)
    before = snapshot(tree, tmp_path / "outside")
    res = run_main(
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(tree),
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "out"),
        "--set",
        "data.num_workers=0",
    )
    one_line(res, 1, f"{tree}/train: no images found in class folders", f"1 link(s) in {tree}/train lead outside")
    assert not (tmp_path / "out").exists()
    unchanged(before)


def test_plain_image_folders_and_denoise_skip_links_out_of_the_folder(world, run_main, tmp_path):
    folder = shutil.copytree(world.images / "val" / "a", tmp_path / "plain")
    (folder / "zz.png").symlink_to(secret(tmp_path / "outside"))
    before = snapshot(folder, tmp_path / "outside")
    res = run_main(
        "prepare-data",
        "--source",
        "images",
        "--data",
        str(folder),
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "out"),
        "--set",
        "data.num_workers=0",
    )
    assert res.returncode == 0, res.stderr
    assert f"data: 1 link(s) in {folder} lead outside {folder}" in res.stdout
    assert json.loads((tmp_path / "out" / "prepared.json").read_text())["splits"]["train"]["images"] == 8
    one = tmp_path / "one"
    one.mkdir()
    (one / "0.png").write_bytes((folder / "0.png").read_bytes())
    (one / "zz.png").symlink_to(tmp_path / "outside" / "secret.png")
    res = run_main("denoise", str(one), "--ckpt", str(world.ckpt), "--out", str(tmp_path / "panels"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert f"1 link(s) in {one} lead outside {one}" in res.stdout
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["0-denoised.png"]
    unchanged(before)


def test_archive_members_that_are_links_are_never_read(world, run_main, tmp_path):
    outside = secret(tmp_path / "outside")
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(world.images, arcname="data")
        for name, kind, target in (
            ("data/train/a/zz.png", tarfile.SYMTYPE, str(outside)),
            ("data/train/a/zy.png", tarfile.SYMTYPE, "../../../../outside/secret.png"),
            ("data/train/b/zz.png", tarfile.LNKTYPE, str(outside)),
        ):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, target
            tar.addfile(member, io.BytesIO(b""))
    before = snapshot(tmp_path)
    res = run_main(
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(archive),
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "out"),
        "--set",
        "data.num_workers=0",
    )
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "out" / "prepared.json").read_text())
    assert meta["splits"]["train"]["images"] == 16 and meta["classes"] == ["a", "b"]
    unchanged(before)
