"""The one plotting helper: image grids and panels (PIL) and loss curves (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldae_cli.data import to_uint8


def _to_pil(image: torch.Tensor, upscale: int = 1) -> Image.Image:
    """(3, H, W) float in [-1, 1] or uint8 -> PIL, enlarged with nearest-neighbour (keeps pixels visible)."""
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.Resampling.NEAREST)
    return pil


def save_grid(rows: list[list[torch.Tensor]], path: Path, upscale: int = 1, pad: int = 2,
              titles: list[str] | None = None, background=(255, 255, 255)) -> Path:
    """Tile equally sized images: rows[r][c]. Optional column titles above the first row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, upscale, pad, titles, background).save(path)
    return path


def grid_tensor(rows: list[list[torch.Tensor]], upscale: int = 1, titles: list[str] | None = None) -> torch.Tensor:
    """`save_grid`'s picture as uint8 (3, H, W), for a dashboard."""
    return torch.from_numpy(np.array(grid_image(rows, upscale, titles=titles))).permute(2, 0, 1).contiguous()


def grid_image(rows: list[list[torch.Tensor]], upscale: int = 1, pad: int = 2, titles: list[str] | None = None,
               background=(255, 255, 255)) -> Image.Image:
    tiles = [[_to_pil(img, upscale) for img in row] for row in rows]
    th, tw = tiles[0][0].height, tiles[0][0].width
    ncol = max(len(r) for r in tiles)
    title_h = 14 if titles else 0
    canvas = Image.new("RGB", (ncol * (tw + pad) + pad, title_h + len(tiles) * (th + pad) + pad), background)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles or []):
        draw.text((pad + c * (tw + pad) + 2, 1), title, fill=(0, 0, 0))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas.paste(tile, (pad + c * (tw + pad), title_h + pad + r * (th + pad)))
    return canvas


def save_filters(basis: torch.Tensor, patch: int, path: Path, count: int = 64, ncol: int = 8) -> Path:
    """PCA components as p x p x 3 images, each stretched to its own range (the paper's App. B)."""
    count = min(count, basis.shape[0])
    filters = basis[:count].reshape(count, patch, patch, 3).permute(0, 3, 1, 2)
    lo = filters.amin(dim=(1, 2, 3), keepdim=True)
    hi = filters.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (filters - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1
    upscale = max(1, 48 // patch)
    rows = [list(scaled[i:i + ncol]) for i in range(0, count, ncol)]
    # pad the last row with white tiles so every row has ncol tiles
    rows[-1] += [torch.ones_like(scaled[0])] * (ncol - len(rows[-1]))
    return save_grid(rows, path, upscale=upscale)


def save_curves(records: list[dict], path: Path, keys: tuple[str, ...] = ("loss",), x: str = "step",
                title: str = "", log_y: bool = True) -> Path | None:
    """Line plot of `keys` against `x` from metrics.jsonl records; None when there is nothing to plot."""
    return save_panels(records, path, [(keys, title, log_y)], x)


def save_panels(records: list[dict], path: Path, panels: list[tuple[tuple[str, ...], str, bool]],
                x: str = "step") -> Path | None:
    """Side-by-side line plots, one per (keys, title, log y) whose keys the records hold; None when none does."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    for keys, title, log_y in panels:
        series = {k: [(r[x], r[k]) for r in records if r.get(k) is not None and x in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            shown.append((series, title, log_y))
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 3.6), dpi=120, squeeze=False)
    for ax, (series, title, log_y) in zip(axes[0], shown):
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k, lw=1.2, marker="o" if len(xs) < 12 else None, ms=3)
        ax.set_xlabel(x)
        if log_y and all(y > 0 for pts in series.values() for _, y in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)

