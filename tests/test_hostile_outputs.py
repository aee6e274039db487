"""Reliability matrix, single-file outputs: a PCA file and its sidecars, an export, a panel or a report never
lands on a user's file, an input, a link, a FIFO or device, or inside the dataset the command reads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import one_line, snapshot, unchanged
from PIL import Image

from ldae_cli.runs.checkpoint import read_metadata
from ldae_cli.runs.outputs import stamp, write_output

FIT = (
    "fit-pca",
    "--source",
    "imagefolder",
    "--patch",
    "4",
    "--dim",
    "4",
    "--patches",
    "500",
    "--image-size",
    "16",
    "--set",
    "data.num_workers=0",
)


def fit(w, out, *extra) -> tuple:
    return (*FIT, "--data", w.data, "--out", out, *extra)


def export(w, out, *extra) -> tuple:
    return ("export", "--ckpt", w.world.ckpt, "--out", out, *extra)


def users_png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def device(w) -> Path:
    """A character device: a node of our own where we may make one (a bug could replace it), else /dev/null,
    which nobody but root can replace."""
    if os.geteuid() != 0:
        return Path("/dev/null")
    os.mknod(w.tmp / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return w.tmp / "null"


# each case: (id, category, the command given the prepared world `w`, fragments of its one line)
HOSTILE = [
    (
        "fit_pca_onto_a_training_image",
        "data-loss",
        lambda w: fit(w, w.image, "--force"),
        lambda w: [str(w.image), "inside", str(w.data)],
    ),
    (
        "fit_pca_into_the_dataset_under_a_new_name",
        "silent-wrong",
        lambda w: fit(w, w.data / "pca.safetensors"),
        lambda w: [str(w.data / "pca.safetensors"), "inside"],
    ),
    (
        "fit_pca_into_the_dataset_through_a_linked_folder",
        "silent-wrong",
        lambda w: fit(w, link(w.tmp / "alias", w.data / "train") / "a" / "pca.safetensors"),
        lambda w: ["alias/a/pca.safetensors", "inside"],
    ),
    (
        "export_over_a_users_text_file",
        "data-loss",
        lambda w: export(w, w.notes, "--force"),
        lambda w: [str(w.notes), "ldae did not write it"],
    ),
    (
        "export_over_a_users_file_without_force",
        "generic",
        lambda w: export(w, w.notes),
        lambda w: [str(w.notes), "ldae did not write it"],
    ),
    (
        "fit_pca_over_a_users_filters_png",
        "data-loss",
        lambda w: fit(w, w.tmp / "pca.safetensors", "--force"),
        lambda w: [str(users_png(w.tmp / "pca.filters.png")), "ldae did not write it"],
    ),
    (
        "fit_pca_sidecar_is_the_users_config",
        "data-loss",
        lambda w: fit(w, w.tmp / "my.safetensors", "--force", "--config", w.config),
        lambda w: [str(w.config), "ldae did not write it"],
    ),
    (
        "fit_pca_over_a_pretrain_checkpoint",
        "data-loss",
        lambda w: fit(w, w.model, "--force"),
        lambda w: [str(w.model), "is a 'pretrain' checkpoint"],
    ),
    (
        "export_through_a_link_to_a_users_file",
        "data-loss",
        lambda w: export(w, link(w.tmp / "vit.safetensors", w.notes), "--force"),
        lambda w: [str(w.tmp / "vit.safetensors"), "symbolic link"],
    ),
    (
        "export_onto_a_dangling_link",
        "generic",
        lambda w: export(w, link(w.tmp / "vit.safetensors", w.tmp / "elsewhere" / "x"), "--force"),
        lambda w: [str(w.tmp / "vit.safetensors"), "symbolic link"],
    ),
    (
        "fit_pca_sidecar_is_a_link",
        "data-loss",
        lambda w: fit(w, w.tmp / "pca.safetensors", "--force"),
        lambda w: [str(link(w.tmp / "pca.config.yaml", w.config)), "symbolic link"],
    ),
    (
        "denoise_onto_its_own_input",
        "data-loss",
        lambda w: ("denoise", w.mine, "--ckpt", w.world.ckpt, "--out", w.mine, "--force"),
        lambda w: [str(w.mine), "also an input"],
    ),
    (
        "denoise_panel_through_a_link_to_an_image",
        "data-loss",
        lambda w: ("denoise", w.mine, "--ckpt", w.world.ckpt, "--out", link(w.tmp / "panel.png", w.image), "--force"),
        lambda w: [str(w.tmp / "panel.png"), "symbolic link"],
    ),
    (
        "denoise_samples_into_the_checkpoints_dataset",
        "silent-wrong",
        lambda w: (
            "denoise",
            "--samples",
            "2",
            "--ckpt",
            w.world.ckpt,
            "--out",
            w.world.images / "val" / "a" / "s.png",
        ),
        lambda w: [str(w.world.images / "val" / "a" / "s.png"), "inside"],
    ),
    (
        "report_over_a_users_png",
        "data-loss",
        lambda w: ("report", w.pca, "--force"),
        lambda w: [str(users_png(w.tmp / "pca.report.png")), "ldae did not write it"],
    ),
    (
        "export_over_an_ldae_picture",
        "generic",
        lambda w: export(w, w.picture, "--force"),
        lambda w: [str(w.picture), "'picture' output of ldae"],
    ),
    ("export_onto_a_fifo", "generic", lambda w: export(w, w.fifo, "--force"), lambda w: [str(w.fifo), "a FIFO"]),
    (
        "fit_pca_sidecar_is_a_fifo",
        "generic",
        lambda w: fit(w, w.tmp / "f.safetensors", "--force"),
        lambda w: [str(w.fifo_sidecar), "a FIFO"],
    ),
    (
        "export_onto_a_device",
        "generic",
        lambda w: export(w, w.device, "--force"),
        lambda w: [str(w.device), "a device"],
    ),
]


@pytest.fixture
def hostile(world, tmp_path):
    """The files a case may meet: a copy of the image dataset, a user's notes, config and image, a copy of the
    PCA file and of the pretrain checkpoint, an ldae picture, FIFOs and a device."""
    data = tmp_path / "data"
    shutil.copytree(world.images, data)
    w = SimpleNamespace(
        world=world,
        tmp=tmp_path,
        data=data,
        image=data / "train" / "a" / "0.png",
        notes=tmp_path / "notes.txt",
        config=tmp_path / "my.config.yaml",
        mine=tmp_path / "mine.png",
        pca=tmp_path / "pca.safetensors",
        model=tmp_path / "model.safetensors",
        picture=tmp_path / "report.png",
        fifo=tmp_path / "fifo",
        fifo_sidecar=tmp_path / "f.filters.png",
    )
    w.notes.write_text("my notes\n")
    w.config.write_text("pca:\n  patch: 4\n")
    shutil.copy2(w.image, w.mine)
    shutil.copy2(world.pca, w.pca)
    shutil.copy2(world.ckpt, w.model)
    write_output(w.picture, users_png(tmp_path / "tmp.png").read_bytes(), "picture")
    (tmp_path / "tmp.png").unlink()
    os.mkfifo(w.fifo)
    os.mkfifo(w.fifo_sidecar)
    w.device = device(w)
    return w


def _timeout(signum, frame):
    raise TimeoutError("the command blocked")


@pytest.mark.parametrize("args,fragments", [c[2:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_single_file_output_never_replaces_what_ldae_did_not_write(args, fragments, hostile, run_main):
    w = hostile
    command, expected = args(w), fragments(w)  # the case's own hostile files are made first

    def entries() -> list[Path]:
        return sorted(p for root in (w.tmp, w.world.root) for p in root.rglob("*"))

    before, listed = snapshot(w.tmp, w.world.root), entries()
    links = [p for p in listed if p.is_symlink()]
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)  # a FIFO opened for reading or writing would block forever
    try:
        res = run_main(*command)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    one_line(res, 1, *expected)
    unchanged(before)
    assert entries() == listed  # nothing written: no output, no sidecar, no temp file
    assert all(p.is_symlink() for p in links)  # a link is never replaced by a file


def test_force_replaces_what_ldae_wrote(world, run_main, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world.images, data)
    w = SimpleNamespace(world=world, data=data)
    out, vit = tmp_path / "pca.safetensors", tmp_path / "vit.safetensors"
    for force in ([], ["--force"]):
        assert run_main(*fit(w, out, *force)).returncode == 0
        assert run_main(*export(w, vit, *force)).returncode == 0
        assert run_main("report", out, *force).returncode == 0
    assert read_metadata(out)["kind"] == "pca" and read_metadata(vit)["kind"] == "encoder"
    assert [
        stamp(tmp_path / n)
        for n in ("pca.safetensors", "pca.config.yaml", "pca.filters.png", "pca.report.png", "vit.safetensors")
    ] == ["pca", "config", "picture", "picture", "encoder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "pca.config.yaml",
        "pca.filters.png",
        "pca.report.png",
        "pca.safetensors",
        "vit.safetensors",
    ]
    # a JSON output (detect's evaluation) is stamped by its first key and keeps its content
    write_output(tmp_path / "eval.json", json.dumps({"bbox": {"AP": 1.5}}).encode(), "evaluation")
    assert stamp(tmp_path / "eval.json") == "evaluation"
    assert json.loads((tmp_path / "eval.json").read_text()) == {"ldae": "evaluation", "bbox": {"AP": 1.5}}
