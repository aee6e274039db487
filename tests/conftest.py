"""Shared fixtures: tiny synthetic datasets written to tmp_path, and a helper that runs the real CLI."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd: str | os.PathLike | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m ldae_cli ARGS` in a subprocess: the real exit code and the real stdout/stderr text."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ldae_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    """run_cli with the working directory in tmp_path (so default outputs like runs/ land there)."""
    def _run(*args, **kwargs):
        kwargs.setdefault("cwd", tmp_path)
        return run_cli(*args, **kwargs)
    return _run


def write_image_tree(root: Path, classes=("cat", "dog", "frog"), per_class: int = 4, size=(20, 16),
                     splits=("train", "val"), seed: int = 0, ext: str = ".png") -> Path:
    """An ImageFolder tree root/<split>/<class>/<i><ext> of random RGB images (width, height = size)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for split in splits:
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                # smooth-ish content (a gradient plus noise) so a PCA has structure to find
                base = np.linspace(0, 200, w)[None, :, None] + rng.integers(0, 55, (h, w, 3))
                arr = np.clip(base, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}{ext}")
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """root/{train,val}/{cat,dog,frog}/000.png.. : 4 random 20x16 RGB PNGs per class."""
    return write_image_tree(tmp_path / "tree")


def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0, gz: bool = True) -> dict:
    """Synthetic Fashion-MNIST IDX files (28x28 uint8 images, labels 0..9); returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[split] = (images, labels)
        for stem, arr in zip(names[split], (images, labels)):
            data = _idx_bytes(arr)
            if gz:
                with gzip.open(root / (stem + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (root / stem).write_bytes(data)
    return arrays


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
