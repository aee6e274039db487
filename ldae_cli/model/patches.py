"""Image patches: the one (row, column, channel) layout every tokenizer, loss, PCA fit and ViT fold shares.

A p x p patch of a C-channel image is the vector x[(r * p + c) * C + ch]; `patchify` cuts an image
into the patches of its p-grid in raster order, `unpatchify` puts them back.
"""

from __future__ import annotations

import torch

from ldae_cli.errors import LdaeError


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C)."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise LdaeError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W), the inverse of `patchify`."""
    b = tokens.shape[0]
    gh, gw = grid
    x = tokens.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


def random_patches(
    images: torch.Tensor, patch: int, per_image: int, gen: torch.Generator, grid: bool = False
) -> torch.Tensor:
    """`per_image` patches at random positions of each image -> (B * per_image, p*p*C), in `patchify`'s layout.

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
