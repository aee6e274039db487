"""The reliability matrix's "your data" cases: a stage reads only the data --data or its input's record names, its
default outputs carry that data's name, and a finished run says it is finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TOKENS,
    one_line,
    pretrain_args,
    probe_args,
    sets,
    snapshot,
    tiny_overrides,
    train_tiny,
    unchanged,
    write_fmnist,
    write_pattern_tree,
)
from PIL import Image

from ldae_cli.runs.checkpoint import read_metadata

PCA = (
    "fit-pca",
    "--patch",
    "4",
    "--dim",
    "8",
    "--patches",
    "2000",
    "--image-size",
    "32",
    "--set",
    "data.num_workers=0",
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 64-px class tree, a second tree, a folder of photos without classes, and a tiny pretrain run whose data
    is a copy of the first tree (moved away or replaced by the cases that need it)."""
    root = tmp_path_factory.mktemp("your-data")
    tree = write_pattern_tree(root / "tree64", size=64)
    other = write_pattern_tree(root / "other", classes=("x", "y"), size=64, seed=1)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    copy = shutil.copytree(tree, root / "mine")
    ckpt = train_tiny("final.yaml", copy, root / "pre-mine", **TOKENS)
    return tree, other, photos, copy, ckpt


@pytest.fixture
def fashion_mnist_installed(tmp_path, monkeypatch):
    """Fashion-MNIST where the old default found it, so a stage that still fell back to it would run silently."""
    write_fmnist(tmp_path / "datasets" / "fashion-mnist")
    monkeypatch.setenv("LDAE_DATA", str(tmp_path / "datasets"))


def export(run_main, ckpt: Path, out: Path, form: str) -> Path:
    res = run_main("export", "--ckpt", str(ckpt), "--out", str(out), "--format", form)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("form, name", [("ldae", "vit.safetensors"), ("timm", "ldae-vit")])
def test_a_probe_of_an_export_reads_the_data_it_was_pretrained_on(
    world, run_main, tmp_path, fashion_mnist_installed, form, name
):
    """silent-wrong: `probe --ckpt ldae-vit` (no --data) probed Fashion-MNIST; the export now records its data."""
    vit = export(run_main, world.ckpt, tmp_path / name, form)
    res = run_main(*probe_args(world, tmp_path / "probe", ckpt=vit))
    assert res.returncode == 0, res.stderr
    assert f"data: {world.images}, which {vit} was pretrained on" in res.stdout.replace("\n", " ")
    data = read_metadata(tmp_path / "probe" / "checkpoint.safetensors")["config"]["data"]
    assert (data["source"], data["path"]) == ("imagefolder", str(world.images))


def forget_data(vit: Path, root: Path) -> None:
    """A `--format timm` export from before exports recorded their data."""
    config = json.loads((vit / "config.json").read_text())
    config["ldae"] = {k: v for k, v in config["ldae"].items() if k not in ("data", "data_identity")}
    (vit / "config.json").write_text(json.dumps(config))


def move_away(vit: Path, root: Path) -> None:
    (root / "mine").rename(root / "mine-moved")


def replace_images(vit: Path, root: Path) -> None:
    (root / "mine").rename(root / "mine-moved")
    write_pattern_tree(root / "mine", size=64, seed=5, per_class=5)


NAMELESS = [  # (case, what happens to the export or its data, what the line says)
    ("export-records-none", forget_data, "records none"),
    ("data-moved-away", move_away, "which is not there any more"),
    ("other-images-there", replace_images, "which holds other images now"),
]


@pytest.mark.parametrize("command", ["probe", "finetune"])
@pytest.mark.parametrize("case, damage, says", NAMELESS, ids=[c[0] for c in NAMELESS])
def test_an_export_whose_data_is_not_named_or_not_there_asks_for_data(
    folders, run_main, tmp_path, fashion_mnist_installed, command, case, damage, says
):
    """silent-wrong: where the record names no data, or data that is gone or changed, the stage stops in one
    line asking for --data, before it writes anything; with --data it runs on that."""
    *_, copy, ckpt = folders
    root = tmp_path / "w"
    shutil.copytree(copy, root / "mine")
    vit = export(run_main, ckpt, tmp_path / "ldae-vit", "timm")
    json_config = json.loads((vit / "config.json").read_text())
    json_config["ldae"]["data"]["path"] = str(root / "mine")  # the copy this case moves or replaces
    (vit / "config.json").write_text(json.dumps(json_config))
    damage(vit, root)
    before = snapshot(tmp_path)
    args = [command, "--ckpt", str(vit), *sets(["run.device=cpu", "data.num_workers=0"])]
    one_line(
        run_main(*args, "--out", str(tmp_path / "run")),
        1,
        f"{command}: nothing names the data to {'probe' if command == 'probe' else 'fine-tune'} on: {vit}",
        says,
        "give --data DIR",
    )
    unchanged(before)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


NO_DATA = [  # (command line without any data, what the line names)
    (["pretrain", "--config", "final.yaml"], "data.source 'imagefolder' needs data.path; give --data DIR"),
    (["pretrain", "--config", "mine.yaml"], "nothing names the data: no --data"),
    (list(PCA), "nothing names the data: no --data"),
    (["probe", "--set", "probe.features=pixels"], "probe: nothing names the data to probe on: no --ckpt records any"),
    (["finetune", "--from-scratch"], "finetune: nothing names the data to fine-tune on: no --ckpt records any"),
]


@pytest.mark.parametrize("args, says", NO_DATA, ids=[" ".join(a[:3]) for a, _ in NO_DATA])
def test_no_data_named_is_one_line_asking_for_it(run_main, tmp_path, fashion_mnist_installed, args, says):
    """silent-wrong: no stage falls back to Fashion-MNIST (installed here), whatever the command."""
    (tmp_path / "mine.yaml").write_text("run:\n  seed: 3\n")  # a user's config that names no data
    if args[0] == "pretrain":
        args = [*args, "--set", "run.device=cpu"]
    before = snapshot(tmp_path)
    one_line(run_main(*args), 1, says, "give --data DIR")
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_the_demo_configs_name_their_data(run_main, tmp_path, fashion_mnist_installed):
    """generic: the Fashion-MNIST default lives in the demo's configs, which name it, so the demo still runs."""
    out = tmp_path / "pca.safetensors"
    res = run_main(
        "fit-pca",
        "--config",
        "demo/fmnist-pca.yaml",
        "--out",
        str(out),
        *sets(["pca.patches=2000", "data.num_workers=0"]),
    )
    assert res.returncode == 0, res.stderr
    assert read_metadata(out)["config"]["data"]["source"] == "fashion-mnist"


def test_default_names_differ_across_two_data_folders(world, folders, run_main, tmp_path):
    """data-loss: fits, runs and probes on two datasets never meet in one default output ("already exists")."""
    tree, other, photos, *_ = folders
    probe = [
        a
        for a in probe_args(world, tmp_path / "x", "probe.warmup_epochs=0.1")
        if a not in ("--out", str(tmp_path / "x"))
    ]  # no --out: the default name
    for data in (tree, other):
        assert run_main(*PCA, "--data", str(data)).returncode == 0
        res = run_main(
            "pretrain",
            "--config",
            "final.yaml",
            "--data",
            str(data),
            *sets(
                [s for s in tiny_overrides(data, tmp_path, **TOKENS) if not s.startswith(("data.", "run.out_dir="))]
                + ["data.image_size=32", "data.num_workers=0"]
            ),
        )
        assert res.returncode == 0, res.stderr
        res = run_main(*probe, "--data", str(data))
        assert res.returncode == 0, res.stderr
    fits = sorted(p.name for p in (tmp_path / "runs" / "pca").glob("*.safetensors"))
    assert len(fits) == 2 and fits[0].startswith("other-p4-d8") and fits[1].startswith("tree64-p4-d8"), fits
    assert sorted(p.name for p in (tmp_path / "runs" / "pretrain").iterdir()) == ["final-other", "final-tree64"]
    assert sorted(p.name for p in (tmp_path / "runs" / "probe").iterdir()) == ["pre-other", "pre-tree64"]
    one_line(run_main(*probe, "--data", str(photos)), 1, "needs labelled data")  # not "already exists"
    assert sorted(p.name for p in (tmp_path / "runs" / "probe").iterdir()) == ["pre-other", "pre-tree64"]


def test_rerunning_a_finished_run_says_it_is_finished(world, run_main, tmp_path):
    """generic: a finished pretrain or probe, run again, says so and names its outputs; never advises --resume."""
    probe = probe_args(world, tmp_path / "probe")
    assert run_main(*probe).returncode == 0
    before = snapshot(world.root, tmp_path)
    for args, where, steps in (
        (pretrain_args(world, world.ckpt.parent), world.ckpt.parent, "step 4 of 4"),
        (probe, tmp_path / "probe", "of"),
    ):
        line = one_line(
            run_main(*args),
            1,
            f"{where} already holds a",
            "checkpoint of a finished run",
            steps,
            "its outputs are",
            "checkpoint.safetensors",
            "pick another --out for a new run",
            "--force to replace it",
        )
        assert "--resume" not in line
    one_line(run_main(*pretrain_args(world, world.cut.parent)), 1, "--resume")  # an unfinished run: resume it
    unchanged(before)
