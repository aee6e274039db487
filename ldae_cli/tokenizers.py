"""Tokenizers: image <-> latent tokens, behind one interface used by pretrain, denoise and probe.

Every tokenizer maps an image (B, 3, H, W) in [-1, 1] to tokens (B, N, d) on a grid of
(H/p) x (W/p) tokens, and back. `patch` is the image footprint of one token in pixels, `token_dim`
the latent size d per token, and the latent is divided by a scale so that it has roughly unit
variance (SPEC §3: `global`, `whiten` or `none`).

Patch vectors are laid out (row, column, channel) everywhere, matching `patchify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from ldae_cli.errors import LdaeError

LatentScale = Literal["global", "whiten", "none"]


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


@dataclass
class TokenizerConfig:
    kind: Literal["pca", "pixel", "trained"] = "pca"
    path: Optional[str] = None  # pca: a fit-pca checkpoint (null: fitted on the training data first); trained: required
    patch: int = 16  # pca/pixel: patch size in pixels (must match the checkpoint when one is given)
    dim: Optional[int] = None  # pca: kept components d (null: the checkpoint's); pixel: must be null
    latent_scale: LatentScale = "global"
    fit_patches: int = 1_000_000  # pca fitted on the fly: patches sampled

    def validate(self) -> None:
        if self.patch < 1:
            raise LdaeError(f"tokenizer.patch: must be positive, got {self.patch}")
        if self.kind == "pixel" and self.dim is not None:
            raise LdaeError("tokenizer.dim: the pixel tokenizer keeps every pixel (d = patch*patch*3); leave dim null")
        if self.kind == "pixel" and self.latent_scale != "none":
            raise LdaeError("tokenizer.latent_scale: the pixel tokenizer has no fitted statistics; use 'none'")
        if self.kind == "trained" and not self.path:
            raise LdaeError("tokenizer.path: a 'trained' tokenizer needs the checkpoint written by train-tokenizer")


class Tokenizer(nn.Module):
    """Base class: subclasses define `encode`/`decode`; tensors live in buffers (move with .to())."""

    kind: str = ""
    patch: int  # pixels per token side
    token_dim: int  # d
    channels: int = 3

    @property
    def image_token_dim(self) -> int:
        """D: one token's footprint in the image, flattened (the input size in image space)."""
        return self.patch * self.patch * self.channels

    @property
    def is_linear(self) -> bool:
        """True when encode is one affine map per patch (then it folds into a ViT patch embedding)."""
        return False

    def grid(self, image_size: int) -> tuple[int, int]:
        if image_size % self.patch:
            raise LdaeError(f"image size {image_size} is not divisible by the tokenizer's patch {self.patch}")
        return image_size // self.patch, image_size // self.patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, description) stored inside pretrain checkpoints so they are self-contained."""
        raise NotImplementedError


class PCATokenizer(Tokenizer):
    """Patch-wise PCA: z = V_d (x - mu) / s, x = V_d^T (s z) + mu, on non-overlapping p x p patches."""

    kind = "pca"

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, eigenvalues: torch.Tensor, patch: int, dim: int,
                 latent_scale: str = "global"):
        super().__init__()
        full = basis.shape[0]
        if basis.shape != (full, full) or mean.shape != (full,) or full != patch * patch * 3:
            raise LdaeError(f"PCA tensors do not fit a {patch}x{patch}x3 patch (basis {tuple(basis.shape)})")
        if not 1 <= dim <= full:
            raise LdaeError(f"tokenizer.dim: PCA keeps between 1 and {full} components, got {dim}")
        self.patch, self.token_dim, self.latent_scale = patch, dim, latent_scale
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", basis.float())  # (D, D), row i = i-th component
        self.register_buffer("eigenvalues", eigenvalues.float())
        self.register_buffer("scale", latent_scales(eigenvalues.float(), dim)[latent_scale])

    @property
    def is_linear(self) -> bool:
        return True

    @property
    def kept(self) -> torch.Tensor:
        return self.basis[: self.token_dim]

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        return ((patches - self.mean) @ self.kept.T) / self.scale

    def decode_patches(self, z: torch.Tensor) -> torch.Tensor:
        return (z * self.scale) @ self.kept + self.mean

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(patchify(images, self.patch))

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return unpatchify(self.decode_patches(tokens), self.patch, grid)

    def kept_energy(self, residual_patches: torch.Tensor) -> torch.Tensor:
        """sum_{i<=d} (V_i r)^2 per token; with sum_i (V_i r)^2 = |r|^2 this gives the w_i-weighted loss."""
        return (residual_patches @ self.kept.T).square().sum(-1)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """encode as z = A x + b on patch vectors: (A (d, D), b (d,))."""
        a = self.kept / self.scale[:, None]
        return a, -(a @ self.mean)

    def export(self):
        tensors = {"mean": self.mean, "basis": self.basis, "eigenvalues": self.eigenvalues}
        return tensors, {"kind": "pca", "patch": self.patch, "dim": self.token_dim, "latent_scale": self.latent_scale}


class PixelTokenizer(Tokenizer):
    """The paper's "pixel tokenizer" (Fig. 4): each patch of the (resized) image is its own latent."""

    kind = "pixel"

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch
        self.token_dim = patch * patch * 3

    @property
    def is_linear(self) -> bool:
        return True

    def encode(self, images):
        return patchify(images, self.patch)

    def decode(self, tokens, grid):
        return unpatchify(tokens, self.patch, grid)

    def kept_energy(self, residual_patches):
        return residual_patches.square().sum(-1)

    def affine(self):
        return torch.eye(self.token_dim), torch.zeros(self.token_dim)

    def export(self):
        return {}, {"kind": "pixel", "patch": self.patch}


def latent_scales(eigenvalues: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    """The divisors of SPEC §3: one rms for `global`, per-component std for `whiten`."""
    kept = eigenvalues[:dim].clamp_min(1e-12)
    return {
        "global": kept.mean().sqrt().expand(dim).clone(),
        "whiten": kept.sqrt(),
        "none": torch.ones(dim),
    }


def pca_from_checkpoint(ckpt, dim: int | None, latent_scale: str, patch: int | None = None) -> PCATokenizer:
    t = ckpt.section("pca")
    kept = ckpt.extra.get("dim") if dim is None else dim
    ckpt_patch = ckpt.extra["patch"]
    if patch is not None and patch != ckpt_patch:
        raise LdaeError(f"tokenizer.patch is {patch} but {ckpt.path} was fitted on {ckpt_patch}x{ckpt_patch} patches")
    return PCATokenizer(t["mean"], t["basis"], t["eigenvalues"], ckpt_patch, kept, latent_scale)


def tokenizer_from_export(tensors: dict[str, torch.Tensor], desc: dict) -> Tokenizer:
    """Rebuild the tokenizer stored inside a pretrain checkpoint."""
    kind = desc["kind"]
    if kind == "pca":
        return PCATokenizer(tensors["mean"], tensors["basis"], tensors["eigenvalues"], desc["patch"], desc["dim"],
                            desc["latent_scale"])
    if kind == "pixel":
        return PixelTokenizer(desc["patch"])
    from ldae_cli.trained_tokenizers import tokenizer_from_description  # the trained kinds (train-tokenizer)

    return tokenizer_from_description(tensors, desc)
