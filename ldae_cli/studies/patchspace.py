"""The patch space a study's runs work in, measured by the tool: for each (data, image size, patch) the share of
the patch variance held by the top d PCA components and the global latent scale s(d) = sqrt(mean of the top d
eigenvalues), from the PCA a run of the study fitted on that data (or, where none did, one fitted here), and the
noise scale each run's tokenizer used: one unit of latent noise is s in patch units on each kept component."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ldae_cli.config import config_from_dict, to_dict
from ldae_cli.data.pipeline import build_dataset
from ldae_cli.model import pca
from ldae_cli.model.tokenizers import build_tokenizer
from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata
from ldae_cli.runs.logs import console
from ldae_cli.settings.training import DataConfig, PretrainConfig

SHARE_DIMS = (8, 16, 32, 48, 64, 128)
FIT_PATCHES = 200_000  # where the study fits its own PCA: enough for D = 768 (16x16 patches) too


def noise_scale(ckpt: Path) -> dict:
    """{'noise_scale': s} of a pretrain run's tokenizer (pixel units per unit of latent noise, 1 for the pixel
    tokenizer); [smallest, largest] where it differs per component (whiten)."""
    ck = load_checkpoint(ckpt, "pretrain")
    tokenizer = build_tokenizer(ck.extra["tokenizer"], ck.section("tokenizer"), ck.path)
    scale = getattr(tokenizer, "scale", None)
    if scale is None:
        return {"noise_scale": 1.0}
    lo, hi = float(scale.min()), float(scale.max())
    return {"noise_scale": round(lo, 3) if math.isclose(lo, hi, rel_tol=1e-6) else [round(lo, 3), round(hi, 3)]}


def fit_here(out: Path, data: DataConfig, patch: int) -> Path:
    """A PCA of the study's own for a patch space none of its runs fitted one for (kept for the next page)."""
    path = out / "patchspace" / f"{data.source}-{data.image_size}-p{patch}.safetensors"
    if not path.is_file():
        settings = pca.PCAConfig(patch=patch, dim=min(16, patch * patch * 3), patches=FIT_PATCHES)
        console.print(
            f"fitting a PCA of {patch}x{patch} patches at {data.image_size}x{data.image_size} for the "
            f"study's patch-space table -> {path}"
        )
        fitted = pca.fit(
            build_dataset(data, "train", augment=False),
            settings,
            data.on_bad_image,
            data.num_workers,
            show_progress=False,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        pca.save_fit(
            fitted, path, settings, {"data": to_dict(data), "pca": vars(settings)}, data.settled_size, data.source
        )
    return path


def tables(out: Path, ckpts: list[Path], dims: set[int]) -> list[dict]:
    """One entry per patch space of the runs (`ckpts`), with the shares at SHARE_DIMS and `dims` below D."""
    spaces: dict[tuple, dict] = {}
    for ckpt in ckpts:
        cfg = config_from_dict(PretrainConfig, read_metadata(ckpt)["config"])
        data, tok = cfg.data, cfg.tokenizer
        key = (data.source, data.path, data.train_split, data.limit, data.image_size, tok.patch)
        space = spaces.setdefault(key, {"data": data, "patch": tok.patch, "fits": []})
        own = ckpt.parent / "pca.safetensors"  # fitted on this data by the run itself (tokenizer.path null)
        if tok.kind == "pca" and not tok.path and own.is_file():
            space["fits"].append(own)
    entries = []
    for space in spaces.values():
        path = space["fits"][0] if space["fits"] else fit_here(out, space["data"], space["patch"])
        fit = load_checkpoint(path, "pca")
        eigenvalues = fit.tensors["pca.eigenvalues"].double().clamp_min(0)
        full = len(eigenvalues)
        shown = sorted(d for d in set(SHARE_DIMS) | dims if d < full)
        total = float(eigenvalues.sum())
        entries.append(
            {
                "data": space["data"].source,
                "image_size": space["data"].image_size,
                "patch": space["patch"],
                "D": full,
                "pca": Path(os.path.relpath(path, out)).as_posix(),
                "patches": fit.extra["n_patches"],
                "share_pct": {d: round(100 * float(eigenvalues[:d].sum()) / total, 3) for d in shown},
                "global_scale": {d: round(math.sqrt(float(eigenvalues[:d].mean())), 3) for d in shown},
            }
        )
    return entries
