"""`ldae fit-pca`: fit the patch-wise PCA tokenizer on a dataset and draw its filters (pca.fit_and_write)."""

from __future__ import annotations

from pathlib import Path

from ldae_cli.config import load_config
from ldae_cli.data.discovery import settle_data
from ldae_cli.data.pipeline import resolve_image_size
from ldae_cli.model.pca import FitPCAConfig, fit_and_write
from ldae_cli.runs.logs import console


def main(config: str | None, overrides: list[str], flags: dict, force: bool = False) -> Path:
    cfg = load_config(FitPCAConfig, config, overrides, flags)
    for note in settle_data(cfg.data) + resolve_image_size(cfg.data, cfg.pca.patch):
        console.print(note)
    return fit_and_write(cfg, force=force)[0]
