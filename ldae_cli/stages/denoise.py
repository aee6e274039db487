"""`ldae denoise`: clean | noisy | denoised panels from any pretrain checkpoint (the paper's Fig. 7),
optionally with the same sigma added to the pixels for comparison (Fig. 6).

Noise is added where the model was trained to remove it (the tokenizer's latent) and the one-step
prediction is turned back into an image whatever the target was (x0, z0 or eps) and whatever
space the network wrote (image or latent).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldae_cli.data.imagefiles import collect_images
from ldae_cli.data.pipeline import load_image_file, to_unit_range
from ldae_cli.data.plots import psnr, save_grid
from ldae_cli.errors import LdaeError
from ldae_cli.model.pretrained import Pretrained, check_sigma, load_pretrained
from ldae_cli.runs.checkpoint import read_metadata
from ldae_cli.runs.distributed import resolve_device
from ldae_cli.runs.logs import console
from ldae_cli.runs.outputs import refuse_to_replace
from ldae_cli.runs.rundir import CHECKPOINT, RUNS
from ldae_cli.seeds import pixel_noise_seed

BATCH = 16


def newest_checkpoint(root: Path = RUNS) -> Path:
    """The newest pretrain checkpoint anywhere under `root` (runs/pretrain, a study's runs, runs/demo, ...)."""

    def pretrain(path: Path) -> bool:
        try:
            return read_metadata(path)["kind"] == "pretrain"
        except LdaeError:
            return False

    found = (
        sorted((p for p in root.rglob(CHECKPOINT) if pretrain(p)), key=lambda p: p.stat().st_mtime)
        if root.is_dir()
        else []
    )
    if not found:
        raise LdaeError(
            f"no pretrain checkpoint found under {root}/; pass --ckpt FILE or train one with "
            "`ldae pretrain --config demo/fmnist.yaml`"
        )
    return found[-1]


def run_name(pre: Pretrained) -> str:
    """The folder of runs/denoise/ a checkpoint's panels go to: its run directory's name (or the file's stem)."""
    assert pre.ckpt is not None  # loaded from a file
    path = pre.ckpt.path
    return path.parent.name if path.name == CHECKPOINT else path.stem


def pixel_noise(images: torch.Tensor, sigma: float, seed: int, first: int = 0) -> torch.Tensor:
    """The same sigma in pixels (the paper's Fig. 6), drawn apart from the latent noise."""
    gen = torch.Generator().manual_seed(pixel_noise_seed(seed, first))
    return images + sigma * torch.randn(images.shape, generator=gen).to(images.device)


def output_paths(out: str | None, files: list[Path], run: str) -> list[Path]:
    """One panel per image: --out itself for a single image and a .png --out, else <stem>-denoised.png in --out
    (default runs/denoise/<run>, so two checkpoints never share one). Images whose stems collide (a/x.jpg,
    b/x.jpg, x.png) are named by their path from the folder they share, so no panel overwrites another."""
    if out and len(files) == 1 and out.lower().endswith(".png"):
        return [Path(out)]
    folder = Path(out) if out else RUNS / "denoise" / run
    stems = [f.stem for f in files]
    clashing = [f.resolve() for f in files if stems.count(f.stem) > 1]
    common = Path(os.path.commonpath(clashing)) if clashing else None
    names = []
    for f in files:
        if common is not None and stems.count(f.stem) > 1:
            names.append("__".join(f.resolve().relative_to(common).parts).replace(".", "_"))
        else:
            names.append(f.stem)
    return [folder / f"{name}-denoised.png" for name in names]


def samples_path(out: str | None, pre: Pretrained, step: int) -> Path:
    if out and out.lower().endswith(".png"):
        return Path(out)
    return (Path(out) if out else RUNS / "denoise" / run_name(pre)) / f"samples-t{step}.png"


def _prepare(ckpt: str | Path | None, ema: bool | None, device: str, t: int | None, sigma: float | None):
    if ckpt is None:
        ckpt = newest_checkpoint()
        console.print(f"using the newest pretrain checkpoint: {ckpt}")
    pre = load_pretrained(ckpt, ema)
    dev = resolve_device(device)
    pre.model.to(dev)
    pre.denoiser.to(dev)
    step = pre.timestep(t, sigma)
    schedule = pre.denoiser.schedule
    if schedule.kind == "constant" and (t is not None or sigma is not None):
        console.print(
            f"note: this model was trained at one noise level (sigma {float(schedule.sigma[1]):.3f}); "
            "--t/--sigma are ignored"
        )
    console.print(
        f"denoising at {pre.image_size}x{pre.image_size} with {Path(ckpt).parent.name} "
        f"(t={step}: gamma={float(schedule.gamma[step]):.3f}, sigma={float(schedule.sigma[step]):.3f})"
    )
    return pre, dev, step, float(schedule.sigma[step])


def _row(clean, noisy, denoised, extra, i):
    return [x[i].cpu() for x in (clean, noisy, denoised)] + ([extra[i].cpu()] if extra is not None else [])


def main(
    inputs: list[str] | None = None,
    *,
    ckpt: str | None = None,
    t: int | None = None,
    sigma: float | None = None,
    seed: int = 0,
    out: str | None = None,
    compare_pixel_noise: bool = False,
    ema: bool | None = None,
    device: str = "auto",
    samples: int | None = None,
    force: bool = False,
    eval_split: str | None = None,
) -> list[Path]:
    """Panels for the given images, or (samples=N) for N eval images of the checkpoint's dataset with mean PSNR."""
    if not inputs and not samples:
        raise LdaeError(
            "give images or folders to denoise, or --samples N to take N images from the "
            "checkpoint's own evaluation split"
        )
    if samples is not None and samples < 1:
        raise LdaeError(f"--samples is a number of images (1 or more), got {samples}")
    check_sigma(sigma)  # before the checkpoint is read: the API checks the same in Pretrained.timestep
    files = collect_images(inputs or [])
    pre, dev, step, level = _prepare(ckpt, ema, device, t, sigma)
    if eval_split is not None:
        pre.data.eval_split = eval_split
    targets = output_paths(out, files, run_name(pre))
    panel = samples_path(out, pre, step) if samples else None
    if panel is not None and panel in targets:
        raise LdaeError(f"--out {out} cannot hold both the panel of {files[0]} and the --samples panel; give a folder")
    # the images, and with --samples the dataset they come from: no panel lands on or in them
    reads = (*files, *([Path(pre.data.path)] if samples and pre.data.path else []))
    for path in targets + ([panel] if panel is not None else []):
        refuse_to_replace(path, force, "panel", "picture", inputs=reads)
    size = pre.image_size
    upscale = max(1, 128 // size)
    titles = ["clean", f"noisy ({level:.2f})", "denoised"] + (
        [f"pixel noise ({level:.2f})"] if compare_pixel_noise else []
    )
    written = []
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        clean = to_unit_range(torch.stack([load_image_file(f, size) for f in chunk])).to(dev)
        noisy, denoised = pre.denoise(clean, step, seed, start)
        extra = pixel_noise(clean, level, seed) if compare_pixel_noise else None
        for i, source in enumerate(chunk):
            path = save_grid(
                [_row(clean, noisy, denoised, extra, i)], targets[start + i], upscale=upscale, titles=titles
            )
            p_noisy, p_denoised = (
                float(psnr(noisy[i : i + 1], clean[i : i + 1])),
                float(psnr(denoised[i : i + 1], clean[i : i + 1])),
            )
            console.print(f"{source} -> {path}  (PSNR noisy {p_noisy:.1f} dB, denoised {p_denoised:.1f} dB)")
            written.append(path)
    if samples and panel is not None:
        written.append(
            _dataset_samples(pre, dev, step, level, samples, seed, panel, compare_pixel_noise, titles, upscale)
        )
    return written


def _dataset_samples(
    pre: Pretrained,
    dev,
    step: int,
    level: float,
    count: int,
    seed: int,
    path: Path,
    compare_pixel_noise: bool,
    titles: list[str],
    upscale: int,
    shown: int = 8,
) -> Path:
    """Mean PSNR of noisy input and denoised output over `count` eval images; a panel of the first few."""
    from ldae_cli.data.pipeline import build_dataset

    data_cfg = pre.data
    data_cfg.limit, data_cfg.cache = count, "never"
    dataset = build_dataset(data_cfg, "eval", augment=False, seed=seed)
    split = (
        "training images: this unlabelled dataset has no evaluation split"
        if data_cfg.source == "images"
        else f"the '{data_cfg.split_name('eval')}' split"
    )
    totals, rows = torch.zeros(2), []
    # panel rows spread over the (class-sorted) subset so that several classes show
    picked = set(torch.linspace(0, len(dataset) - 1, min(shown, len(dataset))).round().long().tolist())
    for start in range(0, len(dataset), BATCH * 4):
        idx = range(start, min(start + BATCH * 4, len(dataset)))
        items = [dataset[i] for i in idx]
        bad = [x for x in items if not isinstance(x, tuple)]
        if bad:
            raise LdaeError(f"{bad[0].name}: cannot read image ({bad[0].reason})")
        clean = to_unit_range(torch.stack([img for img, _ in items])).to(dev)
        noisy, denoised = pre.denoise(clean, step, seed, start)
        totals += torch.stack([psnr(noisy, clean).sum(), psnr(denoised, clean).sum()]).cpu()
        extra = pixel_noise(clean, level, seed, start) if compare_pixel_noise else None
        rows += [_row(clean, noisy, denoised, extra, i) for i, j in enumerate(idx) if j in picked]
    mean_noisy, mean_denoised = (totals / len(dataset)).tolist()
    save_grid(rows, path, upscale=upscale, titles=titles)
    console.print(
        f"{len(dataset)} images ({split}), sigma {level:.3f}: mean PSNR noisy "
        f"{mean_noisy:.2f} dB -> denoised {mean_denoised:.2f} dB ({mean_denoised - mean_noisy:+.2f}); "
        f"panel of {len(rows)}: {path}"
    )
    return path
