"""Shared fixtures: tiny synthetic datasets written to tmp_path, runners of the real CLI, the reliability
matrix's world. The plain helpers they use live in helpers.py, which test modules import directly."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import TOKENS, run_cli, train_tiny, write_coco_split, write_fmnist, write_image_tree, write_pattern_tree


@pytest.fixture
def cli(tmp_path):
    """run_cli with the working directory in tmp_path (so default outputs like runs/ land there)."""

    def _run(*args, **kwargs):
        kwargs.setdefault("cwd", tmp_path)
        return run_cli(*args, **kwargs)

    return _run


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """root/{train,val}/{cat,dog,frog}/000.png.. : 4 random 20x16 RGB PNGs per class."""
    return write_image_tree(tmp_path / "tree")


@pytest.fixture
def fmnist_dir(tmp_path):
    """(folder, {'train': (images, labels), 'test': (images, labels)}) of synthetic gzipped IDX files."""
    root = tmp_path / "fmnist"
    return root, write_fmnist(root)


class InProcessResult:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_main(capsys, monkeypatch, tmp_path):
    """Call `ldae_cli.cli.main()` in this process (fast: no interpreter start) and capture what it prints.

    Same code path as the console script (`main` turns LdaeError into the one-line message), so it is used
    for the many error-message checks; a few tests still go through a real subprocess with `run_cli`.
    """
    from ldae_cli import cli as cli_mod

    def _run(*args) -> InProcessResult:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["ldae", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            cli_mod.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            cli_mod._state["debug"] = False
        out = capsys.readouterr()
        return InProcessResult(code, out.out, out.err)

    return _run


@pytest.fixture(scope="session")
def pattern_tree(tmp_path_factory) -> Path:
    """Two classes x 8 images of 32x32 stripes, splits train and val."""
    return write_pattern_tree(tmp_path_factory.mktemp("patterns"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """A synthetic COCO-format set: 4 train and 2 val images, each with a square and a disc."""
    root = tmp_path_factory.mktemp("coco")
    write_coco_split(root, "train", 4, seed=0)
    write_coco_split(root, "val", 2, seed=1)
    return root


# ------------------------------------------------------------------------ the reliability matrix's shared world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Files every case may read and none may change: images, a finished pretrain run (with its PCA), an
    unfinished one."""
    root = tmp_path_factory.mktemp("world")
    images = write_pattern_tree(root / "images")
    ckpt = train_tiny("final.yaml", images, root / "pre", **TOKENS, **{"optim.epochs": 2})
    cut = train_tiny(
        "final.yaml",
        images,
        root / "cut",
        **TOKENS,
        **{"optim.epochs": 3, "run.save_every": 1, "run.stop_after_steps": 2},
    )
    return SimpleNamespace(root=root, images=images, ckpt=ckpt, pca=root / "pre" / "pca.safetensors", cut=cut)
