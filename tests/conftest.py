"""Shared fixtures: tiny synthetic datasets written to tmp_path, and a helper that runs the real CLI."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def write_pattern_tree(root: Path, classes=("a", "b"), per_class: int = 8, size: int = 32,
                       splits=("train", "val"), seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png: smooth stripes whose frequency depends on the class.

    Structured enough that a PCA, a denoiser and a linear probe each have something real to learn.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split in splits:
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                phase = rng.uniform(0, 6.28, 3)
                freq = 2 + 3 * ci
                img = np.stack([np.sin(freq * 6.28 * (xx if c % 2 else yy) + phase[c]) for c in range(3)], -1)
                img = (img * 0.4 + 0.5 + rng.normal(0, 0.05, img.shape)).clip(0, 1)
                Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def pattern_tree(tmp_path_factory) -> Path:
    """Two classes x 8 images of 32x32 stripes, splits train and val."""
    return write_pattern_tree(tmp_path_factory.mktemp("patterns"))


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    """--set overrides that shrink any pretrain config to a 2-step CPU run on `data` (an ImageFolder tree)."""
    sets = {
        "data.source": "imagefolder", "data.path": str(data), "data.image_size": 32, "data.num_workers": 0,
        "model.size": "custom", "model.width": 32, "model.encoder_depth": 1, "model.decoder_depth": 1,
        "model.num_heads": 2, "tokenizer.fit_patches": 4000, "optim.batch_size": 8, "optim.epochs": 1,
        "optim.warmup_epochs": 0.5, "run.out_dir": str(out), "run.compile": False, "run.progress": False,
        "run.log_every": 1, "run.save_every": 1000, "run.device": "cpu",
    }
    sets.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in sets.items()]


def train_tiny(config: str, data: Path, out: Path, **sets) -> Path:
    """A real pretrain run at toy size; returns its checkpoint."""
    from ldae_cli.config import load_config
    from ldae_cli.stages import pretrain

    cfg = load_config(pretrain.PretrainConfig, config, tiny_overrides(data, out, **sets))
    return pretrain.run(cfg, out.name)


def train_tiny_conv_vae(data: Path, out: Path) -> Path:
    """A conv VAE tokenizer (stride 2, 2 latent channels: 4x4-pixel tokens of 8 dims) trained for 2 steps."""
    from ldae_cli.config import load_config
    from ldae_cli.stages import train_tokenizer

    sets = {"data.source": "imagefolder", "data.path": data, "data.image_size": 32, "data.num_workers": 0,
            "data.eval_split": "train", "tokenizer.stride": 2, "tokenizer.channel_mult": "[1,2]",
            "tokenizer.channels": 8, "tokenizer.latent_channels": 2, "tokenizer.res_blocks": 1,
            "optim.batch_size": 8, "optim.epochs": 1, "report.images": 4, "report.stats_images": 16,
            "report.pca_reference": False, "run.out_dir": out, "run.progress": False, "run.device": "cpu"}
    cfg = load_config(train_tokenizer.TrainTokenizerConfig, "tokenizer/conv-vae", [f"{k}={v}" for k, v in sets.items()])
    return train_tokenizer.run(cfg)


# ------------------------------------------------------------------ the reliability matrix's shared world and checks

TOKENS = {"tokenizer.patch": 4, "tokenizer.dim": 8}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Files every case may read and none may change: images, a finished pretrain run (with its PCA), an
    unfinished one."""
    root = tmp_path_factory.mktemp("world")
    images = write_pattern_tree(root / "images")
    ckpt = train_tiny("final.yaml", images, root / "pre", **TOKENS, **{"optim.epochs": 2})
    cut = train_tiny("final.yaml", images, root / "cut", **TOKENS, **{"optim.epochs": 3, "run.save_every": 1,
                                                                      "run.stop_after_steps": 2})
    return SimpleNamespace(root=root, images=images, ckpt=ckpt, pca=root / "pre" / "pca.safetensors", cut=cut)


def snapshot(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


def unchanged(before: dict[Path, str]) -> None:
    changed = [str(p) for p, digest in before.items()
               if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != digest]
    assert not changed, f"pre-existing files changed or removed: {changed}"


def kept_or_appended(before: dict[Path, str], old_metrics: bytes) -> None:
    """Every file as it was, but metrics.jsonl, which a run only appends to (a step's line comes before its
    checkpoint): its old content must still be its beginning."""
    metrics = next(p for p in before if p.name == "metrics.jsonl")
    unchanged({p: d for p, d in before.items() if p != metrics})
    assert metrics.read_bytes().startswith(old_metrics)


def one_line(res, code: int, *fragments: str) -> str:
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def pretrain_args(world, out: Path, **extra) -> list[str]:
    return ["pretrain", "--config", "final.yaml", *sets(tiny_overrides(world.images, out, **{**TOKENS, **extra}))]


def probe_args(world, out: Path, *extra: str, ckpt=None) -> list[str]:
    return ["probe", "--ckpt", str(ckpt or world.ckpt), "--out", str(out), *sets(
        ["probe.fast=true", "probe.epochs=1", "probe.batch_size=8", "run.progress=false", "data.num_workers=0",
         *extra])]


def rewrite_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` whose metadata `edit(meta)` changed (tensors as they were)."""
    from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata, save_checkpoint

    meta = read_metadata(src)
    edit(meta)
    ck = load_checkpoint(src)
    save_checkpoint(dst, meta["kind"], ck.tensors, meta["config"], extra=meta["extra"])
    return dst
