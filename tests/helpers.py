"""Plain helpers the tests share: synthetic data writers, tiny-run settings, the CLI runners' checks."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args, cwd: str | os.PathLike | None = None, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m ldae_cli ARGS` in a subprocess: the real exit code and the real stdout/stderr text."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ldae_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


def write_image_tree(
    root: Path,
    classes=("cat", "dog", "frog"),
    per_class: int = 4,
    size=(20, 16),
    splits=("train", "val"),
    seed: int = 0,
    ext: str = ".png",
) -> Path:
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


def _idx_bytes(arr: np.ndarray) -> bytes:
    return (
        struct.pack(">HBB", 0, 0x08, arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.astype(np.uint8).tobytes()
    )


def write_fmnist(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0, gz: bool = True) -> dict:
    """Synthetic Fashion-MNIST IDX files (28x28 uint8 images, labels 0..9); returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    names = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
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


def write_pattern_tree(
    root: Path, classes=("a", "b"), per_class: int = 8, size: int = 32, splits=("train", "val"), seed: int = 0
) -> Path:
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


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    """--set overrides that shrink any pretrain config to a 2-step CPU run on `data` (an ImageFolder tree)."""
    sets = {
        "data.source": "imagefolder",
        "data.path": str(data),
        "data.image_size": 32,
        "data.num_workers": 0,
        "model.size": "custom",
        "model.width": 32,
        "model.encoder_depth": 1,
        "model.decoder_depth": 1,
        "model.num_heads": 2,
        "tokenizer.fit_patches": 4000,
        "optim.batch_size": 8,
        "optim.epochs": 1,
        "optim.warmup_epochs": 0.5,
        "run.out_dir": str(out),
        "run.compile": False,
        "run.progress": False,
        "run.log_every": 1,
        "run.save_every": 1000,
        "run.device": "cpu",
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

    sets = {
        "data.source": "imagefolder",
        "data.path": data,
        "data.image_size": 32,
        "data.num_workers": 0,
        "data.eval_split": "train",
        "tokenizer.stride": 2,
        "tokenizer.channel_mult": "[1,2]",
        "tokenizer.channels": 8,
        "tokenizer.latent_channels": 2,
        "tokenizer.res_blocks": 1,
        "optim.batch_size": 8,
        "optim.epochs": 1,
        "report.images": 4,
        "report.stats_images": 16,
        "report.pca_reference": False,
        "run.out_dir": out,
        "run.progress": False,
        "run.device": "cpu",
    }
    cfg = load_config(train_tokenizer.TrainTokenizerConfig, "tokenizer/conv-vae", [f"{k}={v}" for k, v in sets.items()])
    return train_tokenizer.run(cfg)


CATEGORIES = [{"id": 2, "name": "square"}, {"id": 5, "name": "disc"}]  # non-contiguous ids, as in COCO


def write_coco_split(root: Path, split: str, n: int, seed: int) -> None:
    """n images (64x64 and 64x48) with a filled square and a filled disc each, as COCO polygons."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        w, h = 64, (64 if i % 2 else 48)
        img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for cat in CATEGORIES:
            bw, bh = (int(v) for v in rng.integers(12, 24, 2))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            if cat["name"] == "square":
                poly = [(x0, y0), (x0 + bw, y0), (x0 + bw, y0 + bh), (x0, y0 + bh)]
            else:
                cx, cy = x0 + bw / 2, y0 + bh / 2
                poly = [
                    (cx + bw / 2 * math.cos(a), cy + bh / 2 * math.sin(a))
                    for a in np.linspace(0, 2 * math.pi, 16, endpoint=False)
                ]
            draw.polygon(poly, fill=(220, 200, 40) if cat["id"] == 2 else (40, 120, 230))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat["id"],
                    "iscrowd": 0,
                    "bbox": [x0, y0, bw, bh],
                    "area": float(bw * bh),
                    "segmentation": [[float(c) for p in poly for c in p]],
                }
            )
        name = f"{i:06d}.png"
        img.save(root / split / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES})
    )


# --------------------------------------------------------------- the reliability matrix's shared settings and checks

TOKENS = {"tokenizer.patch": 4, "tokenizer.dim": 8}


def snapshot(*roots: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*")) if p.is_file()
    }


def unchanged(before: dict[Path, str]) -> None:
    changed = [
        str(p) for p, digest in before.items() if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != digest
    ]
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
    return [
        "probe",
        "--ckpt",
        str(ckpt or world.ckpt),
        "--out",
        str(out),
        *sets(
            [
                "probe.fast=true",
                "probe.epochs=1",
                "probe.batch_size=8",
                "run.progress=false",
                "data.num_workers=0",
                *extra,
            ]
        ),
    ]


def rewrite_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` whose metadata `edit(meta)` changed (tensors as they were)."""
    from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata, save_checkpoint

    meta = read_metadata(src)
    edit(meta)
    ck = load_checkpoint(src)
    save_checkpoint(dst, meta["kind"], ck.tensors, meta["config"], extra=meta["extra"])
    return dst


def assert_resume_is_bit_exact(config: str, data, tmp_path: Path, sets: dict, sections: tuple[str, ...]):
    """`config` trained 6 steps whole and stopped at 3 then resumed: every checkpoint section in `sections` and every
    logged loss bit-equal. Returns the two checkpoints (whole, resumed)."""
    import json

    import torch

    from ldae_cli.config import load_config
    from ldae_cli.runs.checkpoint import load_checkpoint
    from ldae_cli.settings.training import PretrainConfig
    from ldae_cli.stages import pretrain as stage

    stage.run(load_config(PretrainConfig, config, tiny_overrides(data, tmp_path / "full", **sets)), "full")
    cut = tiny_overrides(data, tmp_path / "cut", **sets, **{"run.stop_after_steps": 3})
    stage.run(load_config(PretrainConfig, config, cut), "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors").extra["step"] == 3
    stage.main(None, [], {}, str(tmp_path / "cut"))
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.safetensors") for run in ("full", "cut"))
    assert a.extra["step"] == b.extra["step"] == 6
    for section in sections:
        assert a.section(section).keys() == b.section(section).keys() and a.section(section)
        assert all(torch.equal(a.section(section)[k], b.section(section)[k]) for k in a.section(section)), section

    def losses(run):
        return [r.get("loss") for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert losses("full") == losses("cut") and len([x for x in losses("full") if x is not None]) == 6
    return a, b


def study_args(folder: Path, data: Path, study: dict, budget: dict, out: str = "out") -> list[str]:
    """`ldae study` of `study` under `budget` (both written as YAML into `folder`) on the image tree `data`, into
    folder/out."""
    (folder / "study.yaml").write_text(yaml.safe_dump(study))
    (folder / "budget.yaml").write_text(yaml.safe_dump(budget))
    return [
        "study",
        str(folder / "study.yaml"),
        "--budget",
        str(folder / "budget.yaml"),
        "--out",
        str(folder / out),
        "--source",
        "imagefolder",
        "--data",
        str(data),
    ]
