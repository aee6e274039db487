"""The one plotting helper: image grids and panels (PIL) and loss curves (matplotlib), each written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldae_cli.data.pipeline import to_uint8
from ldae_cli.runs.outputs import write_output


def _to_pil(image: torch.Tensor, upscale: int = 1) -> Image.Image:
    """(3, H, W) float in [-1, 1] or uint8 -> PIL, enlarged with nearest-neighbour (keeps pixels visible)."""
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.Resampling.NEAREST)
    return pil


def save_grid(
    rows: list[list[torch.Tensor]],
    path: Path,
    upscale: int = 1,
    pad: int = 2,
    titles: list[str] | None = None,
    background=(255, 255, 255),
) -> Path:
    """Tile equally sized images: rows[r][c]. Optional column titles above the first row."""
    buffer = io.BytesIO()
    grid_image(rows, upscale, pad, titles, background).save(buffer, format="png")
    return write_output(Path(path), buffer.getvalue(), "picture")


def grid_tensor(rows: list[list[torch.Tensor]], upscale: int = 1, titles: list[str] | None = None) -> torch.Tensor:
    """`save_grid`'s picture as uint8 (3, H, W), for a dashboard."""
    return torch.from_numpy(np.array(grid_image(rows, upscale, titles=titles))).permute(2, 0, 1).contiguous()


def grid_image(
    rows: list[list[torch.Tensor]],
    upscale: int = 1,
    pad: int = 2,
    titles: list[str] | None = None,
    background=(255, 255, 255),
) -> Image.Image:
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


def save_filters(
    basis: torch.Tensor,
    patch: int,
    path: Path,
    count: int = 64,
    ncol: int = 8,
    eigenvalues: torch.Tensor | None = None,
    dim: int | None = None,
) -> Path:
    """PCA components as p x p x 3 images, each stretched to its own range (the paper's App. B). With the
    eigenvalues, a panel beside them shows each component's share of the variance and the cumulative share,
    the kept `dim` marked."""
    count = min(count, basis.shape[0])
    filters = basis[:count].reshape(count, patch, patch, 3).permute(0, 3, 1, 2)
    lo = filters.amin(dim=(1, 2, 3), keepdim=True)
    hi = filters.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (filters - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1
    upscale = max(1, 48 // patch)
    rows = [list(scaled[i : i + ncol]) for i in range(0, count, ncol)]
    # pad the last row with white tiles so every row has ncol tiles
    rows[-1] += [torch.ones_like(scaled[0])] * (ncol - len(rows[-1]))
    if eigenvalues is None:
        return save_grid(rows, path, upscale=upscale)
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120, width_ratios=(1, 1.25))
    left.imshow(np.array(grid_image(rows, upscale)), interpolation="nearest")
    left.set_axis_off()
    left.set_title(f"the first {count} of {basis.shape[0]} components ({patch}x{patch}x3)", fontsize=9)
    _spectrum(right, eigenvalues, dim)
    return _save(fig, path)


def _spectrum(ax, eigenvalues: torch.Tensor, dim: int | None) -> None:
    """Share of the variance per component (log y) and cumulative (right axis), the kept d marked."""
    share = eigenvalues.double().clamp_min(0).cpu().numpy()
    share = share / max(share.sum(), 1e-30)
    k = np.arange(1, len(share) + 1)
    shown = share > 0  # a zero eigenvalue has no place on a log axis
    ax.plot(k[shown], 100 * share[shown], color="C0", lw=1.2, marker="o" if len(k) <= 64 else None, ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("component")
    ax.set_ylabel("share of the variance (%)", color="C0")
    readable_log_ticks(ax.yaxis)
    if len(k) > 64:  # hundreds of components: the first few, where the variance is, need the room
        ax.set_xscale("log")
        readable_log_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    cumulative = ax.twinx()
    cumulative.plot(k, 100 * np.cumsum(share), color="C1", lw=1.5)
    cumulative.set_ylim(0, 101)
    cumulative.set_ylabel("cumulative share (%)", color="C1")
    title = "PCA spectrum"
    if dim is not None:
        kept = 100 * float(share[:dim].sum())
        ax.axvline(dim, color="C3", ls="--", lw=1)
        cumulative.plot([dim], [kept], "o", color="C3", ms=4)
        cumulative.annotate(
            f"d = {dim}: {kept:.2f}%", (dim, kept), xytext=(6, -14), textcoords="offset points", color="C3", fontsize=9
        )
        title += f": d = {dim} keeps {kept:.2f}% of the variance"
    ax.set_title(title, fontsize=9)


def save_curves(
    records: list[dict],
    path: Path,
    keys: tuple[str, ...] = ("loss",),
    x: str = "step",
    title: str = "",
    log_y: bool = True,
) -> Path | None:
    """Line plot of `keys` against `x` from metrics.jsonl records; None when there is nothing to plot."""
    return save_panels(records, path, [(keys, title, log_y)], x)


def save_panels(
    records: list[dict], path: Path, panels: list[tuple[tuple[str, ...], str, bool]], x: str = "step"
) -> Path | None:
    """Side-by-side line plots, one per (keys, title, log y) whose keys the records hold; None when none does."""
    shown = []
    for keys, title, log_y in panels:
        series = {k: [(r[x], r[k]) for r in records if r.get(k) is not None and x in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            shown.append((series, title, log_y))
    if not shown:
        return None
    fig, axes = _pyplot().subplots(1, len(shown), figsize=(6 * len(shown), 3.6), dpi=120, squeeze=False)
    for ax, (series, title, log_y) in zip(axes[0], shown):
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k, lw=1.2, marker="o" if len(xs) < 12 else None, ms=3)
        ax.set_xlabel(x)
        if log_y and all(y > 0 for pts in series.values() for _, y in pts):
            ax.set_yscale("log")
            readable_log_ticks(ax.yaxis)
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title, fontsize=9)
    return _save(fig, path)


def save_probe_chart(results: dict, path: Path) -> Path | None:
    """A linear probe's results.json as a chart: top-1 (and top-5) of each head against its base lr, the best
    head marked, k-NN top-1 as a horizontal line; None when the results hold no heads (a stopped run)."""
    heads = results.get("heads") or []
    if not heads:
        return None
    fig, ax = _pyplot().subplots(figsize=(6.4, 4), dpi=120)
    blrs = [h["blr"] for h in heads]
    ax.plot(blrs, [h["top1"] for h in heads], color="C0", marker="o", label="top-1")
    if all(h.get("top5") is not None for h in heads):
        ax.plot(blrs, [h["top5"] for h in heads], color="C0", ls=":", marker=".", alpha=0.6, label="top-5")
    diverged = [h for h in heads if h.get("train_loss") is None]
    if diverged:
        ax.scatter(
            [h["blr"] for h in diverged],
            [h["top1"] for h in diverged],
            marker="x",
            s=60,
            color="C3",
            zorder=3,
            label="diverged",
        )
    best = max(heads, key=lambda h: h["top1"])  # the first of equals, as the probe picks it
    ax.scatter(
        [best["blr"]],
        [best["top1"]],
        marker="*",
        s=220,
        color="C1",
        zorder=4,
        label=f"best: blr {best['blr']:g}, {best['top1']:.2f}",
    )
    if results.get("knn_top1") is not None:
        ax.axhline(results["knn_top1"], color="C2", ls="--", lw=1.2, label=f"k-NN top-1 {results['knn_top1']:.2f}")
    ax.set_xscale("log")
    ax.set_xticks(blrs, [f"{b:g}" for b in blrs])
    ax.xaxis.set_minor_formatter(_ticker().NullFormatter())
    ax.set_xlabel("base learning rate (blr) of the head")
    ax.set_ylabel(f"accuracy on {results.get('eval_split', 'the eval split')} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"linear probe: {results.get('encoder', '')}", fontsize=9)
    return _save(fig, path)


def readable_log_ticks(axis) -> None:
    """Ticks of a log-scaled axis as plain decimals (0.2, 0.1, 0.05, 0.02) at 1-2-5 steps, instead of
    matplotlib's 10^k and 1.5x10^-1 labels; a range narrower than that gets evenly spaced ticks. An axis reaching
    below 0.0001 or above 10000 labels every tick as 1e-19, 1e+05: a plain decimal there is a row of zeros."""
    ticker = _ticker()
    lo, hi = sorted(axis.get_view_interval())
    lo = max(lo, 1e-300)
    ticks: list[float] = []
    for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        found = [
            m * 10.0**e
            for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
            for m in mantissas
            if lo <= m * 10.0**e <= hi
        ]
        if len(found) >= 3:
            ticks = found[:: -(-len(found) // 9)]  # at most 9 labels however many decades
            break
    if not ticks:
        ticks = [v for v in ticker.MaxNLocator(nbins=4).tick_values(lo, hi) if lo <= v <= hi and v > 0]
    axis.set_major_locator(ticker.FixedLocator(ticks))
    short = all(1e-4 <= v < 1e4 for v in ticks)
    axis.set_major_formatter(
        ticker.FuncFormatter(
            lambda v, _: (
                plain_number(v) if short else np.format_float_scientific(v, precision=3, trim="-", exp_digits=1)
            )
        )
    )
    axis.set_minor_formatter(ticker.NullFormatter())


def plain_number(value: float) -> str:
    """A tick label without exponent: 4 significant digits, trailing zeros dropped (0.15, 0.001, 20)."""
    return np.format_float_positional(np.float64(value), precision=4, unique=False, fractional=False, trim="-")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return write_output(Path(path), buffer.getvalue(), "picture")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)
