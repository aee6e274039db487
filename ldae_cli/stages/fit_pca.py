"""`ldae fit-pca`: the patch-wise PCA basis of SPEC §3, fitted by streaming random patches.

Patches (p x p x 3, images in [-1, 1]) are taken at random positions of randomly chosen,
center-cropped images and merged batch by batch into a float64 mean/covariance accumulator
(Chan's parallel update, so no cancellation however many patches stream through). The full D x D
eigenbasis, sorted by eigenvalue, is saved; the tokenizer keeps the first d rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ldae_cli.checkpoint import save_checkpoint
from ldae_cli.config import save_resolved, to_dict
from ldae_cli.data import DataConfig, ImageDataset, build_dataset, make_loader, BadImageCounter, to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.plots import save_filters
from ldae_cli.reporting import console, progress_bar
from ldae_cli.tokenizers import latent_scales


@dataclass
class PCASettings:
    patch: int = 16
    dim: int = 16
    patches: int = 1_000_000
    patches_per_image: int = 16
    batch_images: int = 256
    seed: int = 0
    # 'grid': patches where the tokenizer cuts them (JPEG's 8x8 blocks align with that grid, so
    # statistics at other offsets differ measurably); 'any': every pixel offset
    positions: Literal["grid", "any"] = "grid"

    def validate(self) -> None:
        full = self.patch * self.patch * 3
        if self.patch < 1:
            raise LdaeError(f"pca.patch: must be positive, got {self.patch}")
        if not 1 <= self.dim <= full:
            raise LdaeError(f"pca.dim: must be between 1 and patch*patch*3 = {full}, got {self.dim}")
        if self.patches < full + 1:
            raise LdaeError(f"pca.patches: need more patches than dimensions ({full}), got {self.patches}")
        if self.patches_per_image < 1 or self.batch_images < 1:
            raise LdaeError("pca.patches_per_image and pca.batch_images must be positive")


@dataclass
class FitPCAConfig:
    data: DataConfig = field(default_factory=DataConfig)
    pca: PCASettings = field(default_factory=PCASettings)
    out: Optional[str] = None  # default: runs/pca/<source>-p<patch>-d<dim>.safetensors


class CovarianceAccumulator:
    """Running mean and scatter matrix in float64, merged batch by batch (Chan et al.)."""

    def __init__(self, dim: int):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        batch_mean = x.mean(0)
        centred = x - batch_mean
        delta = batch_mean - self.mean
        total = self.n + m
        self.scatter += centred.T @ centred + torch.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def covariance(self) -> torch.Tensor:
        return self.scatter / max(self.n - 1, 1)


def principal_components(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and basis rows; each row's largest entry is made positive (stable signs)."""
    eigenvalues, vectors = torch.linalg.eigh(cov)
    eigenvalues, basis = eigenvalues.flip(0).clamp_min(0), vectors.flip(1).T.contiguous()
    signs = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    return eigenvalues, basis * signs


def random_patches(images: torch.Tensor, patch: int, per_image: int, gen: torch.Generator,
                   grid: bool = False) -> torch.Tensor:
    """`per_image` patches at random positions of each image -> (B * per_image, p*p*C), (row, col, ch) order.

    grid=True draws only positions of the tokenizer's own p x p grid (what it will encode).
    """
    b, c, h, w = images.shape
    if grid:
        ys = torch.randint(0, h // patch, (b, per_image), generator=gen) * patch
        xs = torch.randint(0, w // patch, (b, per_image), generator=gen) * patch
    else:
        ys = torch.randint(0, h - patch + 1, (b, per_image), generator=gen)
        xs = torch.randint(0, w - patch + 1, (b, per_image), generator=gen)
    offs = torch.arange(patch)
    rows = (ys[..., None, None] + offs[:, None]).expand(b, per_image, patch, patch)
    cols = (xs[..., None, None] + offs[None, :]).expand(b, per_image, patch, patch)
    img_idx = torch.arange(b)[:, None, None, None].expand_as(rows)
    patches = images.permute(0, 2, 3, 1)[img_idx, rows, cols]  # (B, K, p, p, C)
    return patches.reshape(b * per_image, patch * patch * c)


@dataclass
class PCAFit:
    mean: torch.Tensor
    basis: torch.Tensor
    eigenvalues: torch.Tensor
    n_patches: int

    def variance_explained(self, dim: int) -> float:
        return float(self.eigenvalues[:dim].sum() / self.eigenvalues.sum().clamp_min(1e-30))


def fit(dataset: ImageDataset, settings: PCASettings, on_bad_image: str = "error", num_workers: int = 0,
        show_progress: bool = True) -> PCAFit:
    p = settings.patch
    if dataset.size < p:
        raise LdaeError(f"pca.patch {p} is larger than the images ({dataset.size}x{dataset.size})")
    gen = torch.Generator().manual_seed(settings.seed)
    n_images = math.ceil(settings.patches / settings.patches_per_image)
    passes = math.ceil(n_images / len(dataset))
    order = torch.cat([torch.randperm(len(dataset), generator=gen) for _ in range(passes)])[:n_images].tolist()
    batches = [order[i:i + settings.batch_images] for i in range(0, n_images, settings.batch_images)]
    acc = CovarianceAccumulator(p * p * 3)
    bad = BadImageCounter(on_bad_image)
    remaining = settings.patches
    with progress_bar("patch", show_progress) as bar:
        task = bar.add_task("fit-pca", total=settings.patches, info="")
        for batch in make_loader(dataset, batches, num_workers):
            images = to_unit_range(bad.check(batch).images)
            patches = random_patches(images, p, settings.patches_per_image, gen,
                                     grid=settings.positions == "grid")[:remaining]
            acc.update(patches)
            remaining -= patches.shape[0]
            bar.update(task, advance=patches.shape[0])
    if acc.n <= p * p * 3:
        raise LdaeError(f"only {acc.n} patches could be read; PCA of {p * p * 3} dims needs more")
    eigenvalues, basis = principal_components(acc.covariance())
    return PCAFit(acc.mean, basis, eigenvalues, acc.n)


def default_out(cfg: FitPCAConfig) -> Path:
    return Path("runs") / "pca" / f"{cfg.data.source}-p{cfg.pca.patch}-d{cfg.pca.dim}.safetensors"


def save(result: PCAFit, cfg: FitPCAConfig, out: Path) -> Path:
    dim = cfg.pca.dim
    scales = latent_scales(result.eigenvalues, dim)
    tensors = {"pca.mean": result.mean, "pca.basis": result.basis, "pca.eigenvalues": result.eigenvalues,
               "pca.whiten_std": result.eigenvalues.clamp_min(0).sqrt()}
    extra = {"patch": cfg.pca.patch, "dim": dim, "channels": 3, "n_patches": result.n_patches,
             "variance_explained": result.variance_explained(dim), "latent_scale_global": float(scales["global"][0]),
             "image_size": cfg.data.image_size, "dataset": cfg.data.source}
    return save_checkpoint(out, "pca", tensors, to_dict(cfg), extra=extra)


def run(cfg: FitPCAConfig, show_progress: bool = True) -> tuple[Path, PCAFit]:
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    dataset = build_dataset(cfg.data, "train", augment=False, seed=cfg.pca.seed)
    console.print(f"fit-pca: {len(dataset):,} images from {cfg.data.source}, {cfg.pca.patches:,} patches of "
                  f"{cfg.pca.patch}x{cfg.pca.patch}x3 (D = {cfg.pca.patch ** 2 * 3})")
    result = fit(dataset, cfg.pca, cfg.data.on_bad_image, cfg.data.num_workers, show_progress)
    save(result, cfg, out)
    stem = out.with_suffix("")
    save_resolved(cfg, stem.with_name(stem.name + ".config.yaml"))
    filters = save_filters(result.basis, cfg.pca.patch, stem.with_name(stem.name + ".filters.png"))
    console.print(f"variance explained by d = {cfg.pca.dim} of {result.basis.shape[0]} components: "
                  f"[bold]{100 * result.variance_explained(cfg.pca.dim):.2f}%[/bold]")
    console.print(f"wrote {out} and {filters}")
    return out, result
