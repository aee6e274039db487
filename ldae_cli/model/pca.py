"""The patch-wise PCA tokenizer's basis (the paper's Sec. 4.2), fitted by streaming random patches (what
`ldae fit-pca` runs).

Patches (p x p x 3, images in [-1, 1]) are taken at random positions of randomly chosen,
center-cropped images (or, when pca.patches reaches the distinct patches the images hold, every one of
those once: more draws would only repeat them) and merged batch by batch into a float64 mean/covariance
accumulator (Chan's parallel update, so no cancellation however many patches stream through). The full
D x D eigenbasis, sorted by eigenvalue, is kept; the tokenizer keeps the first d rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ldae_cli.config import dump_yaml, to_dict
from ldae_cli.data.pipeline import BadImageCounter, ImageDataset, build_dataset, make_loader, to_unit_range
from ldae_cli.data.plots import save_filters
from ldae_cli.data.sources import resolve_path
from ldae_cli.errors import LdaeError
from ldae_cli.model.patches import random_patches
from ldae_cli.model.tokenizers import latent_normalization
from ldae_cli.runs.checkpoint import save_checkpoint
from ldae_cli.runs.logs import console, progress_bar
from ldae_cli.runs.outputs import refuse_to_replace, write_output
from ldae_cli.runs.rundir import RUNS, data_name, remove_temp_files
from ldae_cli.settings.training import FitPCAConfig, PCAConfig


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


@dataclass
class PCAFit:
    mean: torch.Tensor
    basis: torch.Tensor
    eigenvalues: torch.Tensor
    n_patches: int
    skipped: int = 0  # unreadable images left out (data.on_bad_image=skip)
    data_identity: str = ""  # what the images were (ImageDataset.identity): a file names the data it was fitted on

    def variance_explained(self, dim: int) -> float:
        return float(self.eigenvalues[:dim].sum() / self.eigenvalues.sum().clamp_min(1e-30))


def distinct_patches(n_images: int, image_size: int, settings: PCAConfig) -> int:
    """How many different patches `fit` can draw: every image's positions on the p-grid ('grid') or at every
    pixel offset ('any')."""
    p = settings.patch
    side = image_size // p if settings.positions == "grid" else image_size - p + 1
    return n_images * max(side, 0) ** 2


def oversampling(n_images: int, image_size: int, settings: PCAConfig) -> str | None:
    """A warning when pca.patches reaches the distinct patches the images hold (`fit` then takes each once), and
    when they are fewer than the D dimensions of a patch (the fit is rank-deficient); None otherwise."""
    distinct = distinct_patches(n_images, image_size, settings)
    if distinct == 0 or settings.patches <= distinct:  # none at all: `fit` says why
        return None
    where = f"positions on the {settings.patch}-pixel grid" if settings.positions == "grid" else "pixel offsets"
    full = settings.patch**2 * 3
    rank = (
        f"; the fit is rank-deficient: {distinct:,} distinct patches for D = {full:,} dimensions; components "
        f"beyond {distinct:,} are noise: add images"
        if distinct < full
        else ""
    )
    return (
        f"fitting on each of the {distinct:,} distinct patches ({n_images:,} images x {distinct // n_images:,} "
        f"{where}) once, not on --patches {settings.patches:,}: more draws would only repeat them{rank}"
    )


def fit(
    dataset: ImageDataset,
    settings: PCAConfig,
    on_bad_image: str = "error",
    num_workers: int = 0,
    show_progress: bool = True,
) -> PCAFit:
    p = settings.patch
    if dataset.size < p:
        raise LdaeError(f"pca.patch {p} is larger than the images ({dataset.size}x{dataset.size})")
    gen = torch.Generator().manual_seed(settings.seed)
    grid = settings.positions == "grid"
    distinct = distinct_patches(len(dataset), dataset.size, settings)
    every = distinct <= settings.patches  # every distinct patch once (`oversampling` says so): more only repeats them
    total = distinct if every else settings.patches
    n_images = len(dataset) if every else math.ceil(total / settings.patches_per_image)
    passes = math.ceil(n_images / len(dataset))
    order = (
        list(range(n_images))
        if every
        else torch.cat([torch.randperm(len(dataset), generator=gen) for _ in range(passes)])[:n_images].tolist()
    )
    batches = [order[i : i + settings.batch_images] for i in range(0, n_images, settings.batch_images)]
    acc = CovarianceAccumulator(p * p * 3)
    bad = BadImageCounter(on_bad_image)
    remaining = total
    with progress_bar("patch", show_progress) as bar:
        task = bar.add_task("fit-pca", total=total, info="")
        for batch in make_loader(dataset, batches, num_workers):
            images = to_unit_range(bad.check(batch).images)
            chunks = (
                (all_patches(image, p, grid) for image in images)
                if every
                else [random_patches(images, p, settings.patches_per_image, gen, grid=grid)[:remaining]]
            )
            for patches in chunks:  # every patch: an image at a time, as all its offsets may be many
                acc.update(patches)
                remaining -= patches.shape[0]
                bar.update(task, advance=patches.shape[0])
    if acc.n < min(total, p * p * 3 + 1):
        raise LdaeError(f"only {acc.n} patches could be read; PCA of {p * p * 3} dims needs more")
    eigenvalues, basis = principal_components(acc.covariance())
    return PCAFit(acc.mean, basis, eigenvalues, acc.n, dataset.skipped + bad.skipped, dataset.identity())


def all_patches(image: torch.Tensor, p: int, grid: bool) -> torch.Tensor:
    """Every patch of one (C, H, W) image on the p-grid or at every pixel offset, in `patchify`'s layout."""
    step = p if grid else 1
    tiles = image.unfold(1, p, step).unfold(2, p, step)  # (C, rows, columns, p, p)
    return tiles.permute(1, 2, 3, 4, 0).reshape(-1, p * p * image.shape[0])


def save_fit(result: PCAFit, out: Path, settings: PCAConfig, config: dict, image_size: int, dataset: str) -> Path:
    """A `pca` checkpoint: mean, full basis and eigenvalues; the metadata says what d = settings.dim keeps."""
    dim = settings.dim
    variance = result.eigenvalues[:dim].clamp_min(1e-12)
    _, global_scale = latent_normalization(torch.zeros_like(variance), variance, "global")
    tensors = {
        "pca.mean": result.mean,
        "pca.basis": result.basis,
        "pca.eigenvalues": result.eigenvalues,
        "pca.whiten_std": result.eigenvalues.clamp_min(0).sqrt(),
    }
    extra = {
        "patch": settings.patch,
        "dim": dim,
        "channels": 3,
        "n_patches": result.n_patches,
        "skipped_images": result.skipped,
        "variance_explained": result.variance_explained(dim),
        "latent_scale_global": float(global_scale[0]),
        "image_size": image_size,
        "dataset": dataset,
        "data_identity": result.data_identity,
    }
    return save_checkpoint(out, "pca", tensors, config, extra=extra)


def default_out(cfg: FitPCAConfig) -> Path:
    """runs/pca/<data folder>-p<patch>-d<dim>-<image size>px.safetensors: named after the data (rundir.data_name), so
    fits of two datasets never meet; the one place that names it (pretrain looks for the same file)."""
    return RUNS / "pca" / f"{data_name(cfg.data)}-p{cfg.pca.patch}-d{cfg.pca.dim}-{cfg.data.image_size}px.safetensors"


def sidecars(out: Path) -> tuple[Path, Path]:
    """The resolved config and the filters PNG written beside the PCA file."""
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".config.yaml"), stem.with_name(stem.name + ".filters.png")


def fit_and_write(
    cfg: FitPCAConfig, show_progress: bool = True, force: bool = False, dataset: ImageDataset | None = None
) -> tuple[Path, PCAFit]:
    """Fit and write the PCA file with its config and filters; on `dataset` when given (pretrain's training images,
    read already), else on cfg.data's (its image size settled)."""
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    config_file, filters_file = sidecars(out)
    for path, kind, what in (
        (out, "pca", "PCA fit"),
        (config_file, "config", "config of the PCA fit"),
        (filters_file, "picture", "filters picture of the PCA fit"),
    ):
        refuse_to_replace(path, force, what, kind, inputs=(resolve_path(cfg.data),))
    if out.parent.is_dir():
        remove_temp_files(out.parent, out.name)  # of an earlier fit killed while saving
    if dataset is None:
        dataset = build_dataset(cfg.data, "train", augment=False, seed=cfg.pca.seed)
    console.print(
        f"fit-pca: {len(dataset):,} images from {cfg.data.source}, {cfg.pca.patches:,} patches of "
        f"{cfg.pca.patch}x{cfg.pca.patch}x3 (D = {cfg.pca.patch**2 * 3})"
    )
    warning = oversampling(len(dataset), dataset.size, cfg.pca)
    if warning:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    result = fit(dataset, cfg.pca, cfg.data.on_bad_image, cfg.data.num_workers, show_progress)
    if result.skipped:
        console.print(f"skipped {result.skipped:,} unreadable image(s) (data.on_bad_image=skip)")
    save_fit(result, out, cfg.pca, to_dict(cfg), cfg.data.settled_size, cfg.data.source)
    write_output(config_file, dump_yaml(cfg).encode(), "config")
    filters = save_filters(result.basis, cfg.pca.patch, filters_file, eigenvalues=result.eigenvalues, dim=cfg.pca.dim)
    console.print(
        f"variance explained by d = {cfg.pca.dim} of {result.basis.shape[0]} components: "
        f"[bold]{100 * result.variance_explained(cfg.pca.dim):.2f}%[/bold]"
    )
    console.print(f"wrote {out} and {filters}")
    return out, result
