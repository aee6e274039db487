"""`ldae fit-pca`: fit the patch-wise PCA tokenizer (ldae_cli/pca.py) on a dataset and draw its filters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ldae_cli import pca
from ldae_cli.config import dump_yaml, load_config, to_dict
from ldae_cli.data import DataConfig, build_dataset
from ldae_cli.plots import save_filters
from ldae_cli.logs import console
from ldae_cli.outputs import refuse_to_replace, write_output
from ldae_cli.rundir import RUNS, remove_temp_files
from ldae_cli.sources import resolve_path


@dataclass
class FitPCAConfig:
    data: DataConfig = field(default_factory=DataConfig)
    pca: pca.PCAConfig = field(default_factory=pca.PCAConfig)
    out: Optional[str] = None  # default: runs/pca/<source>-p<patch>-d<dim>.safetensors


def default_out(cfg: FitPCAConfig) -> Path:
    return RUNS / "pca" / f"{cfg.data.source}-p{cfg.pca.patch}-d{cfg.pca.dim}.safetensors"


def outputs(out: Path) -> tuple[Path, Path]:
    """The resolved config and the filters PNG written beside the PCA file."""
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".config.yaml"), stem.with_name(stem.name + ".filters.png")


def run(cfg: FitPCAConfig, show_progress: bool = True, force: bool = False) -> tuple[Path, pca.PCAFit]:
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    config_file, filters_file = outputs(out)
    for path, kind, what in ((out, "pca", "PCA fit"), (config_file, "config", "config of the PCA fit"),
                             (filters_file, "picture", "filters picture of the PCA fit")):
        refuse_to_replace(path, force, what, kind, inputs=(resolve_path(cfg.data),))
    if out.parent.is_dir():
        remove_temp_files(out.parent, out.name)  # of an earlier fit killed while saving
    dataset = build_dataset(cfg.data, "train", augment=False, seed=cfg.pca.seed)
    console.print(f"fit-pca: {len(dataset):,} images from {cfg.data.source}, {cfg.pca.patches:,} patches of "
                  f"{cfg.pca.patch}x{cfg.pca.patch}x3 (D = {cfg.pca.patch ** 2 * 3})")
    warning = pca.oversampling(len(dataset), dataset.size, cfg.pca)
    if warning:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    result = pca.fit(dataset, cfg.pca, cfg.data.on_bad_image, cfg.data.num_workers, show_progress)
    if result.skipped:
        console.print(f"skipped {result.skipped:,} unreadable image(s) (data.on_bad_image=skip)")
    pca.save_fit(result, out, cfg.pca, to_dict(cfg), cfg.data.image_size, cfg.data.source)
    write_output(config_file, dump_yaml(cfg).encode(), "config")
    filters = save_filters(result.basis, cfg.pca.patch, filters_file, eigenvalues=result.eigenvalues, dim=cfg.pca.dim)
    console.print(f"variance explained by d = {cfg.pca.dim} of {result.basis.shape[0]} components: "
                  f"[bold]{100 * result.variance_explained(cfg.pca.dim):.2f}%[/bold]")
    console.print(f"wrote {out} and {filters}")
    return out, result


def main(config: str | None, overrides: list[str], flags: dict, force: bool = False) -> Path:
    cfg = load_config(FitPCAConfig, config, overrides, flags)
    for note in cfg.data.resolve():
        console.print(note)
    return run(cfg, force=force)[0]
