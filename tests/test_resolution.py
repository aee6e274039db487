"""Reliability matrix, the resolution and PCA-reuse rows: the image size a stage reads at is the data's native one
unless a config says otherwise, is said in the plan and --dry-run (with the upsampling warning), a PCA file is never
used at another size, and pretrain reuses the PCA `ldae fit-pca` wrote for the same data, patch, d and size."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    one_line,
    sets,
    snapshot,
    tiny_overrides,
    unchanged,
    write_pattern_tree,
)
from PIL import Image

from ldae_cli.data.pipeline import DataConfig, native_image_size
from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata

SMALL = {"tokenizer.patch": 8, "tokenizer.fit_patches": 2000, "data.image_size": None}  # native 64: 64 tokens


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A 64-px ImageFolder tree (2 classes x 8 images, train and val), in a folder named `tree`."""
    return write_pattern_tree(tmp_path_factory.mktemp("res") / "tree", size=64)


def flat(text: str) -> str:
    """Printed text with the console's line wrapping undone."""
    return " ".join(text.split())


def fit(run_main, data: Path, *extra):
    return run_main("fit-pca", "--data", data, "--patches", "2000", "--set", "data.num_workers=0", *extra)


def pretrain(run_main, data: Path, out: Path | None, *extra, **overrides):
    # out None: the default run directory under runs/ (the command as a user types it)
    args = tiny_overrides(
        data, out or Path("unused"), **{**SMALL, **overrides, **({} if out else {"run.out_dir": None})}
    )
    return run_main("pretrain", "--config", "final.yaml", *sets(args), *extra)


def test_native_size_is_the_median_short_side_rounded_down_to_the_patch(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (w, h) in enumerate([(80, 60), (50, 52), (100, 70)]):  # short sides 60, 52, 70: median 60
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(photos / f"{i}.png")
    data = DataConfig(source="images", path=str(photos))
    note = (
        "data: image size 48 (native: median short side 60 of 3 sampled images; rounded down to a multiple of patch 16)"
    )
    assert native_image_size(data, 16) == (48, note)
    assert native_image_size(data, 4)[0] == 60


def test_fit_pca_reads_at_the_native_size_says_so_and_records_size_and_data(run_main, tree, tmp_path):
    res = fit(run_main, tree, "--patch", "16", "--dim", "16")
    assert res.returncode == 0, res.stderr
    assert (
        "data: image size 64 (native: median short side 64 of 16 sampled images; a multiple of patch 16)" in res.stdout
    )
    extra = read_metadata(tmp_path / "runs" / "pca" / "tree-p16-d16-64px.safetensors")["extra"]
    assert extra["image_size"] == 64 and len(extra["data_identity"]) == 64  # a sha256 of the training images


def test_dry_run_says_the_size_and_warns_of_upsampling_as_a_start_would(run_main, tree, tmp_path):
    before = snapshot(tree)
    res = pretrain(run_main, tree, tmp_path / "run", "--dry-run", **{"data.image_size": 128})
    assert res.returncode == 0, res.stderr
    assert "data: image size 128 (data.image_size)" in res.stdout
    assert "data.image_size 128 is above the images' own resolution" in res.stdout and "upsampled 2x" in res.stdout
    assert "16 training images at 128x128" in res.stdout
    assert not (tmp_path / "run").exists()
    unchanged(before)


def test_a_pca_fitted_at_another_size_is_refused_naming_both(run_main, tree, tmp_path):
    assert (
        fit(run_main, tree, "--patch", "8", "--dim", "8", "--image-size", "32", "--out", "p32.safetensors").returncode
        == 0
    )
    before = snapshot(tmp_path)
    res = pretrain(run_main, tree, tmp_path / "run", **{"tokenizer.path": tmp_path / "p32.safetensors"})
    one_line(res, 1, "p32.safetensors was fitted on 32x32 images", "this run's image size is 64", "data.image_size=32")
    assert not (tmp_path / "run").exists()
    unchanged(before)


def test_pretrain_reuses_the_pca_fit_pca_wrote_for_this_data_patch_d_and_size(run_main, tree, tmp_path):
    assert fit(run_main, tree, "--patch", "8", "--dim", "8").returncode == 0
    pca = tmp_path / "runs" / "pca" / "tree-p8-d8-64px.safetensors"
    before = snapshot(tmp_path / "runs" / "pca")
    res = pretrain(run_main, tree, tmp_path / "run", **{"tokenizer.dim": 8})
    assert res.returncode == 0, res.stderr
    assert (
        f"tokenizer: {Path('runs/pca/tree-p8-d8-64px.safetensors')}, the PCA `ldae fit-pca` fitted on this data"
        in flat(res.stdout)
    )
    parents = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").provenance["parents"]
    assert [Path(p["path"]).resolve() for p in parents if p["role"] == "tokenizer"] == [pca.resolve()]
    assert not (tmp_path / "run" / "pca.safetensors").exists()
    unchanged(before)


def test_pretrain_fits_where_fit_pca_would_and_the_next_run_reuses_it(run_main, tree, tmp_path):
    first = pretrain(run_main, tree, None, **{"tokenizer.dim": 8})
    shared = Path("runs/pca/tree-p8-d8-64px.safetensors")
    assert first.returncode == 0, first.stderr
    assert f"fitting the PCA on the training data (patch 8, d = 8, image size 64) -> {shared}" in flat(first.stdout)
    for name in ("tree-p8-d8-64px.safetensors", "tree-p8-d8-64px.config.yaml", "tree-p8-d8-64px.filters.png"):
        assert (tmp_path / "runs" / "pca" / name).is_file(), name
    assert read_metadata(tmp_path / shared)["extra"]["image_size"] == 64
    before = snapshot(tmp_path / "runs")
    second = pretrain(run_main, tree, tmp_path / "second", **{"tokenizer.dim": 8})
    assert second.returncode == 0, second.stderr
    assert f"tokenizer: {shared}, the PCA `ldae fit-pca` fitted on this data" in flat(second.stdout)
    assert "fitting" not in second.stdout
    unchanged(before)


def test_the_cards_fit_pca_d16_meets_final_yaml_d32_said_with_the_set_that_uses_it(run_main, tree, tmp_path):
    assert fit(run_main, tree, "--patch", "8", "--dim", "16").returncode == 0
    res = pretrain(run_main, tree, None, "--dry-run")  # final.yaml's d = 32
    assert res.returncode == 0, res.stderr
    mine = Path("runs/pca/tree-p8-d16-64px.safetensors")
    assert (
        f"fitting the PCA on the training data (patch 8, d = 32, image size 64) -> "
        f"{Path('runs/pca/tree-p8-d32-64px.safetensors')}; {mine} (`ldae fit-pca` on this data, d = 16) is not "
        f"used: this config keeps d = 32; --set tokenizer.path={mine} uses it instead"
    ) in flat(res.stdout)


def test_a_pca_of_other_images_under_the_same_name_is_not_used_and_said(run_main, tree, tmp_path):
    other = write_pattern_tree(tmp_path / "elsewhere" / "tree", size=64, seed=1)  # same folder name, other images
    assert fit(run_main, other, "--patch", "8", "--dim", "8").returncode == 0
    shared = Path("runs/pca/tree-p8-d8-64px.safetensors")
    before = snapshot(tmp_path / "runs")
    res = pretrain(run_main, tree, tmp_path / "run", "--dry-run", **{"tokenizer.dim": 8})
    assert res.returncode == 0, res.stderr
    assert f"tokenizer: {shared} is a PCA of other images than these: fitting the PCA on the training data" in flat(
        res.stdout
    )
    unchanged(before)
    shutil.rmtree(tmp_path / "elsewhere")
