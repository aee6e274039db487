"""ldae as a library: the l-DAE encoder as a timm ViT, its features for a folder of images, one-step denoising.

    import ldae_cli as ldae
    encoder = ldae.load_encoder("runs/pretrain/final/checkpoint.safetensors")   # timm ViT, folded at t = 10
    features = ldae.extract_features(encoder, "photos/")                        # (N, dim), sorted file order
    pre = ldae.load_pretrained("runs/pretrain/final/checkpoint.safetensors")
    noisy, denoised = ldae.denoise(pre, "photos/", sigma=0.577)                 # (N, 3, S, S), [-1, 1] scale

Images are read as the stages read them: center-cropped and resized to the model's input size, scaled to [-1, 1].
`import ldae_cli` re-exports these names lazily: torch is imported on their first use, not before.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from timm.models.vision_transformer import VisionTransformer

from ldae_cli.data.imagefiles import collect_images
from ldae_cli.data.pipeline import load_image_file, to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.model import pretrained as _pretrained
from ldae_cli.model.describe import describe_checkpoint

__all__ = ["load_encoder", "load_pretrained", "extract_features", "denoise", "info", "collect_images"]

Images = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], torch.Tensor]
DENOISE_BATCH = 16  # images per forward; the noise of image i depends only on (seed, i), not on this


def load_encoder(
    path: str | os.PathLike, t: int = _pretrained.DEFAULT_T, depth: int | None = None, ema: bool | None = None
) -> VisionTransformer:
    """The l-DAE encoder as a timm VisionTransformer in eval mode, on the CPU.

    path: a pretrain checkpoint (its encoder is folded at timestep `t` after `depth` blocks, default the
    encoder/decoder split; `ema`: the EMA weights, default when the run kept them), an `encoder` checkpoint from
    `ldae export`, or a folder from `ldae export --format timm` (both folded already: `t` and `ema` do not apply).
    `encoder(images)` gives the average-pooled features of [-1, 1] images at the input size.
    """
    vit, _, _ = _pretrained.load_encoder(path, t, depth, ema)
    return vit.eval()


def load_pretrained(path: str | os.PathLike, ema: bool | None = None) -> _pretrained.Pretrained:
    """The whole denoising model of a pretrain checkpoint, with its tokenizer and noise schedule (for `denoise`).
    ema: the EMA weights; None = when the run kept them."""
    return _pretrained.load_pretrained(path, ema)


def info(path: str | os.PathLike) -> dict:
    """What a checkpoint, run directory or timm export folder is, as `ldae info --json` prints it."""
    return describe_checkpoint(path)


def extract_features(
    encoder: VisionTransformer, images: Images, batch_size: int = 64, device: str | torch.device | None = None
) -> torch.Tensor:
    """Average-pooled features, float32 (N, dim) on the CPU, one row per image.

    images: a folder (searched recursively; rows in sorted file order), image files and folders, or a batch
    tensor at the encoder's input size: uint8 in [0, 255] or float in [-1, 1], (N, 3, H, W).
    device: where to run (the encoder is moved there); None = where the encoder is.
    """
    if batch_size < 1:
        raise LdaeError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder = encoder.to(device).eval()
    size = encoder.patch_embed.img_size[0]
    rows = []
    with torch.inference_mode():
        for batch in _batches(images, size, batch_size):
            # forward_head(pre_logits=True): the pooled features even when a classifier head was added
            rows.append(encoder.forward_head(encoder.forward_features(batch.to(device)), pre_logits=True).float().cpu())
    return torch.cat(rows)


def denoise(
    pretrained: _pretrained.Pretrained, images: Images, sigma: float | None = None, t: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, denoised) images on the [-1, 1] scale (noise takes some values beyond it: clamp to show them),
    (N, 3, S, S) on the CPU, as `ldae denoise` makes them: noise added in
    the tokenizer's latent at timestep `t`, or at the t whose noise level is closest to `sigma` (default
    sqrt(1/3), the paper's figures), then one forward pass. Image i's noise depends only on (seed, i).
    images: as for `extract_features`, at the model's image size (`pretrained.image_size`)."""
    step = pretrained.timestep(t, sigma)
    device = next(pretrained.model.parameters()).device
    pretrained.denoiser.to(device)
    noisy, denoised, start = [], [], 0
    for batch in _batches(images, pretrained.image_size, DENOISE_BATCH):
        n, d = pretrained.denoise(batch.to(device), step, seed, start)
        noisy.append(n.cpu())
        denoised.append(d.cpu())
        start += len(batch)
    return torch.cat(noisy), torch.cat(denoised)


def _batches(images: Images, size: int, batch_size: int):
    """[-1, 1] float batches of `images` at size x size: files read batch by batch (a folder may be large)."""
    if isinstance(images, torch.Tensor):
        batch = _tensor_images(images, size)
        yield from batch.split(batch_size)
        return
    files = collect_images([images] if isinstance(images, (str, os.PathLike)) else list(images))
    for start in range(0, len(files), batch_size):
        yield to_unit_range(torch.stack([load_image_file(f, size) for f in files[start : start + batch_size]]))


def _tensor_images(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or not len(images) or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
        raise LdaeError(
            f"images: expected a (N, 3, {size}, {size}) batch, got shape {tuple(images.shape)}; pass "
            "image files or a folder to have them center-cropped and resized"
        )
    if images.dtype == torch.uint8:
        return to_unit_range(images)
    if not images.is_floating_point():
        raise LdaeError(f"images: expected uint8 or float values, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise LdaeError(
            "images: the batch holds NaN or infinite values; pass uint8 pixels, or x / 127.5 - 1 of finite ones"
        )
    if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
        raise LdaeError(
            f"images: float values must lie in [-1, 1] (got {float(images.min()):.3g} .. "
            f"{float(images.max()):.3g}); pass uint8 pixels, or x / 127.5 - 1"
        )
    return images.float()
