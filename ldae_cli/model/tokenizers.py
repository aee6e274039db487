"""Tokenizers: image <-> latent tokens, behind one interface used by pretrain, denoise and probe.

Every tokenizer maps an image (B, 3, H, W) in [-1, 1] to tokens (B, N, d) on a grid of
(H/p) x (W/p) tokens, and back. `patch` is the image footprint of one token in pixels, `token_dim`
the latent size d per token, and the latent is normalised, z = (latent - shift) / scale, so that it
has roughly unit variance (`latent_scale`: `global`, `whiten` or `none`), or, for a PCA, by the scale of
another d (`fixed`), so that the same noise lands on the kept components at every d.

Kinds, one registry (`TOKENIZER_KINDS`), one factory (`build_tokenizer`); a kind a config names has `configured`:
- `pca`: patch-wise PCA (fitted by `ldae fit-pca`), z = V_d (x - mu) / s.
- `pixel`: the paper's "pixel tokenizer" (Fig. 4), each patch is its own latent.
- `conv-vae`, `patch-vae`, `patch-ae`: autoencoders trained by `ldae train-tokenizer`, frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldae_cli.errors import LdaeError
from ldae_cli.model.autoencoders import Autoencoder, PatchAutoencoder, build_autoencoder
from ldae_cli.model.patches import patchify, unpatchify
from ldae_cli.runs.checkpoint import load_checkpoint, load_state
from ldae_cli.settings.training import TokenizerConfig


def latent_normalization(
    mean: torch.Tensor, variance: torch.Tensor, latent_scale: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with z = (latent - shift) / scale, from the latent's mean and variance per dim.

    `global`: one rms over the kept dims, sqrt(mean_i var_i); `whiten`: one std per dim; `none`: no
    change. PCA latents are centred by construction (mean 0, variance = the eigenvalues); learned
    latents are centred by their measured mean, so both kinds mean the same by each option.
    """
    if latent_scale == "none":
        return torch.zeros_like(mean), torch.ones_like(variance)
    if latent_scale == "global":
        return mean.clone(), variance.mean().sqrt().expand_as(variance).clone()
    if latent_scale == "whiten":
        return mean.clone(), variance.sqrt()
    raise LdaeError(
        f"tokenizer.latent_scale: {latent_scale!r} is not one of 'global', 'whiten', 'none' ('fixed' is "
        "for PCA tokenizers only)"
    )


class Tokenizer(nn.Module):
    """The interface: `encode`, `decode` and `export` are required; tensors live in buffers (move with .to()).

    `encode_patches` / `decode_patches` work on patch vectors (B, N, D) in `patchify`'s layout; the
    defaults go through the image, tokenizers that act patch by patch override them. Tokenizers with
    an orthonormal basis (`orthonormal`) provide `kept_energy`, linear ones (`is_linear`) `affine`.
    """

    kind: str = ""
    patch: int  # pixels per token side
    token_dim: int  # d
    channels: int = 3
    is_linear: bool = False  # encode is one affine map per patch (folds into a ViT patch embedding)
    orthonormal: bool = False  # encode projects onto orthonormal directions (the x0 loss can weight them)

    @property
    def image_token_dim(self) -> int:
        """D: one token's footprint in the image, flattened (the input size in image space)."""
        return self.patch * self.patch * self.channels

    def grid(self, image_size: int) -> tuple[int, int]:
        if image_size % self.patch:
            raise LdaeError(f"image size {image_size} is not divisible by the tokenizer's patch {self.patch}")
        return image_size // self.patch, image_size // self.patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def encode_patches(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.encode(unpatchify(patches, self.patch, grid))

    def decode_patches(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return patchify(self.decode(tokens, grid), self.patch)

    def kept_energy(self, residual_patches: torch.Tensor) -> torch.Tensor:
        """sum_{i<=d} (V_i r)^2 per token: with sum_i (V_i r)^2 = |r|^2 this gives the w_i-weighted x0 loss."""
        raise LdaeError(f"the '{self.kind}' tokenizer has no orthonormal basis to weight the loss by")

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """encode as z = A x + b on patch vectors: (A (d, D), b (d,))."""
        raise LdaeError(f"the '{self.kind}' tokenizer is not one affine map per patch")

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, description) stored inside pretrain checkpoints; `build_tokenizer` reads them back."""
        raise NotImplementedError

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], desc: dict) -> "Tokenizer":
        raise NotImplementedError

    @classmethod
    def configured(cls, cfg: TokenizerConfig, path: str | Path | None) -> tuple["Tokenizer", list[dict]]:
        raise NotImplementedError


class PCATokenizer(Tokenizer):
    """Patch-wise PCA: z = V_d (x - mu) / s, x = V_d^T (s z) + mu, on non-overlapping p x p patches. With latent_scale
    'fixed', s is the global scale of the first `scale_dim` components, not of the d kept ones."""

    kind = "pca"
    is_linear = True
    orthonormal = True
    mean: torch.Tensor  # buffers
    basis: torch.Tensor
    eigenvalues: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        mean: torch.Tensor,
        basis: torch.Tensor,
        eigenvalues: torch.Tensor,
        patch: int,
        dim: int,
        latent_scale: str = "global",
        scale_dim: int | None = None,
    ):
        super().__init__()
        full = basis.shape[0]
        if basis.shape != (full, full) or mean.shape != (full,) or full != patch * patch * 3:
            raise LdaeError(f"PCA tensors do not fit a {patch}x{patch}x3 patch (basis {tuple(basis.shape)})")
        if not 1 <= dim <= full:
            raise LdaeError(f"tokenizer.dim: PCA keeps between 1 and {full} components, got {dim}")
        self.patch, self.token_dim, self.latent_scale, self.scale_dim = patch, dim, latent_scale, scale_dim
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", basis.float())  # (D, D), row i = i-th component
        self.register_buffer("eigenvalues", eigenvalues.float())
        if latent_scale == "fixed":
            if scale_dim is None or not 1 <= scale_dim <= full:
                raise LdaeError(
                    f"tokenizer.scale_dim: latent_scale 'fixed' needs between 1 and {full} components, got {scale_dim}"
                )
            scale = self.eigenvalues[:scale_dim].clamp_min(1e-12).mean().sqrt().expand(dim).clone()
        else:
            scale = latent_normalization(torch.zeros(dim), self.eigenvalues[:dim].clamp_min(1e-12), latent_scale)[1]
        self.register_buffer("scale", scale)

    @classmethod
    def from_export(cls, tensors, desc):
        return cls(
            tensors["mean"],
            tensors["basis"],
            tensors["eigenvalues"],
            desc["patch"],
            desc["dim"],
            desc["latent_scale"],
            desc.get("scale_dim"),
        )

    @classmethod
    def configured(cls, cfg, path):
        ckpt = load_checkpoint(path, "pca")
        if cfg.patch != ckpt.extra["patch"]:
            raise LdaeError(
                f"tokenizer.patch is {cfg.patch} but {ckpt.path} was fitted on "
                f"{ckpt.extra['patch']}x{ckpt.extra['patch']} patches"
            )
        desc = {
            "kind": "pca",
            "patch": ckpt.extra["patch"],
            "dim": cfg.dim or ckpt.extra["dim"],
            "latent_scale": cfg.latent_scale,
            "scale_dim": cfg.scale_dim,
        }
        return build_tokenizer(desc, ckpt.section("pca")), [ckpt.parent_ref("tokenizer")]

    @property
    def kept(self) -> torch.Tensor:
        return self.basis[: self.token_dim]

    def encode_patches(self, patches: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return ((patches - self.mean) @ self.kept.T) / self.scale

    def decode_patches(self, z: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return (z * self.scale) @ self.kept + self.mean

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(patchify(images, self.patch))

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return unpatchify(self.decode_patches(tokens), self.patch, grid)

    def kept_energy(self, residual_patches: torch.Tensor) -> torch.Tensor:
        return (residual_patches @ self.kept.T).square().sum(-1)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.kept / self.scale[:, None]
        return a, -(a @ self.mean)

    def export(self):
        tensors = {"mean": self.mean, "basis": self.basis, "eigenvalues": self.eigenvalues}
        return tensors, {
            "kind": "pca",
            "patch": self.patch,
            "dim": self.token_dim,
            "latent_scale": self.latent_scale,
            "scale_dim": self.scale_dim,
        }


class PixelTokenizer(Tokenizer):
    """The paper's "pixel tokenizer" (Fig. 4): each patch of the (resized) image is its own latent."""

    kind = "pixel"
    is_linear = True
    orthonormal = True

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch
        self.token_dim = patch * patch * 3

    @classmethod
    def from_export(cls, tensors, desc):
        return cls(desc["patch"])

    @classmethod
    def configured(cls, cfg, path):
        return cls(cfg.patch), []

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


class TrainedTokenizer(Tokenizer):
    """A frozen autoencoder from `ldae train-tokenizer`: encode = posterior mean, normalised by the latent
    statistics measured at the end of its training.

    Parameters never receive gradients, but encode/decode are differentiable in their inputs (the
    z0 target re-encodes the network's image output).
    """

    latent_mean: torch.Tensor  # buffers
    latent_std: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self, net: Autoencoder, latent_mean: torch.Tensor, latent_std: torch.Tensor, latent_scale: str = "global"
    ):
        super().__init__()
        if latent_mean.shape != (net.token_dim,) or latent_std.shape != (net.token_dim,):
            raise LdaeError(
                f"latent statistics of shape {tuple(latent_mean.shape)} do not fit a tokenizer "
                f"with {net.token_dim} dims per token"
            )
        self.kind, self.patch, self.token_dim = net.spec["kind"], net.patch, net.token_dim
        self.latent_scale = latent_scale
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("latent_mean", latent_mean.float())
        self.register_buffer("latent_std", latent_std.float())
        shift, scale = latent_normalization(self.latent_mean, self.latent_std.clamp_min(1e-6).square(), latent_scale)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    @classmethod
    def from_export(cls, tensors, desc):
        net = build_autoencoder(desc["net"])
        load_state(
            net,
            {k[len("net.") :]: v for k, v in tensors.items() if k.startswith("net.")},
            f"the {desc['kind']} tokenizer",
        )
        return cls(net, tensors["latent_mean"], tensors["latent_std"], desc["latent_scale"])

    @classmethod
    def configured(cls, cfg, path):  # whichever kind of autoencoder the train-tokenizer checkpoint holds
        ckpt = load_checkpoint(path, "tokenizer")
        extra = ckpt.extra
        if not extra.get("finished"):
            raise LdaeError(
                f"{ckpt.path}: this train-tokenizer run stopped at step {extra.get('step')} of "
                f"{extra.get('total_steps')}, before its latent statistics were measured; finish it with "
                f"`ldae train-tokenizer --resume {Path(ckpt.path).parent}`"
            )
        stats = ckpt.section("stats")
        tensors = {
            **{f"net.{k}": v for k, v in ckpt.section("net").items()},
            "latent_mean": stats["mean"],
            "latent_std": stats["std"],
        }
        tokenizer = build_tokenizer(
            {"kind": extra["tokenizer"]["kind"], "net": extra["tokenizer"], "latent_scale": cfg.latent_scale}, tensors
        )
        if cfg.patch != tokenizer.patch:
            raise LdaeError(
                f"tokenizer.patch is {cfg.patch} but {ckpt.path} has tokens of {tokenizer.patch}x"
                f"{tokenizer.patch} pixels; set tokenizer.patch={tokenizer.patch}"
            )
        if cfg.dim is not None and cfg.dim != tokenizer.token_dim:
            raise LdaeError(
                f"tokenizer.dim is {cfg.dim} but {ckpt.path} has {tokenizer.token_dim} dims per token; "
                f"set tokenizer.dim={tokenizer.token_dim} or null"
            )
        return tokenizer, [ckpt.parent_ref("tokenizer")]

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # frozen: a parent module's .train() must not change it
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        mean, _ = self.net.posterior(images)
        return (mean - self.shift) / self.scale

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.net.decode_tokens(tokens * self.scale + self.shift, grid)

    def export(self):
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({"latent_mean": self.latent_mean, "latent_std": self.latent_std})
        return tensors, {"kind": self.kind, "net": self.net.spec, "latent_scale": self.latent_scale}


class LinearTrainedTokenizer(TrainedTokenizer):
    """Patch VAE / AE: encode is one affine map per patch, so it folds into a ViT patch embedding."""

    is_linear = True
    net: PatchAutoencoder  # TOKENIZER_KINDS gives this class the patch kinds only

    def encode_patches(self, patches: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        mean, _ = self.net.encode_patches(patches)
        return (mean - self.shift) / self.scale

    def decode_patches(self, z: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.net.decoder(z * self.scale + self.shift)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.token_dim
        weight, bias = self.net.encoder.weight[:d], self.net.encoder.bias[:d]  # the mean rows
        a = weight / self.scale[:, None]
        return a, (bias - self.shift) / self.scale


# a kind's name, as a checkpoint stores it and a config names it (tokenizer.kind 'trained': any of the autoencoders)
TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {
    "pca": PCATokenizer,
    "pixel": PixelTokenizer,
    "trained": TrainedTokenizer,
    "conv-vae": TrainedTokenizer,
    "patch-vae": LinearTrainedTokenizer,
    "patch-ae": LinearTrainedTokenizer,
}


def build_tokenizer(desc: dict, tensors: dict[str, torch.Tensor], where: str | Path = "the tokenizer") -> Tokenizer:
    """The one factory: a tokenizer from its description and tensors (as `Tokenizer.export` writes them).
    `where` (e.g. the checkpoint it is stored in) names what does not fit, never a raw KeyError."""
    cls = TOKENIZER_KINDS.get(desc.get("kind", ""))
    if cls is None:
        raise LdaeError(
            f"{where}: unknown tokenizer kind {desc.get('kind')!r}; this ldae knows {', '.join(TOKENIZER_KINDS)}"
        )
    try:
        return cls.from_export(tensors, desc)
    except (KeyError, TypeError) as exc:
        raise LdaeError(
            f"{where}: the stored {desc['kind']} tokenizer lacks {exc}; the file is damaged or was not written by ldae"
        ) from None


def load_tokenizer(cfg: TokenizerConfig, path: str | Path | None = None) -> tuple[Tokenizer, list[dict]]:
    """The tokenizer a pretrain config names (a fit-pca or train-tokenizer checkpoint at `path` or
    tokenizer.path, or the pixel tokenizer) and its provenance entry. A checkpoint's patch size or d
    that differs from the config's is an error, not a silent reinterpretation."""
    return TOKENIZER_KINDS[cfg.kind].configured(cfg, path or cfg.path)
