"""Noise schedules, targets and losses of every step of the paper's deconstruction (its Sec. 4).

z_t = gamma_t z0 + sigma_t eps in the tokenizer's (scaled) latent space. The network reads the noisy
latent itself (`input_space: latent`) or its decoding to an image (`image`, e.g. inverse PCA), and
writes latent tokens or image patches (`output_space`). Targets: `eps` (the noise), `z0` (the clean
latent, from an image-space output by re-encoding it) or `x0` (the original image, loss weighted
per PCA component: 1 for the first d, `tail_weight` beyond).
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import nn

from ldae_cli.errors import LdaeError
from ldae_cli.model.patches import patchify, unpatchify
from ldae_cli.model.tokenizers import Tokenizer
from ldae_cli.settings.training import DiffusionConfig, LossWeight, Schedule


def schedule_table(kind: str, T: int, constant_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma_t, sigma_t) for t = 0..T in float64; t = 0 is the clean latent.

    ddpm:          gamma_t^2 = prod_{s<=t} (1 - beta_s), beta linear 1e-4 -> 0.02; sigma_t^2 = 1 - gamma_t^2
    linear-gamma2: gamma_t^2 = 1 - t/T, sigma_t^2 = t/T (variance preserving, linear in gamma^2)
    linear-sigma:  gamma_t = 1, sigma_t = sqrt(2) t/T (no input scaling; sigma ends at sqrt(2))
    constant:      gamma_t = 1, sigma_t = constant_sigma for every t >= 1 (one noise level)
    """
    t = torch.arange(T + 1, dtype=torch.float64)
    if kind == "ddpm":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        gamma2 = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        return gamma2.sqrt(), (1 - gamma2).sqrt()
    if kind == "linear-gamma2":
        return (1 - t / T).sqrt(), (t / T).sqrt()
    if kind == "linear-sigma":
        return torch.ones_like(t), math.sqrt(2) * t / T
    if kind == "constant":
        sigma = torch.full_like(t, constant_sigma)
        sigma[0] = 0.0
        return torch.ones_like(t), sigma
    raise LdaeError(f"diffusion.schedule: unknown schedule {kind!r}; choose one of {', '.join(get_args(Schedule))}")


def loss_weights(kind: str, gamma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda_t per timestep: 1, gamma_t^2, the SNR gamma_t^2 / sigma_t^2, or 1 / (1 + sigma_t^2)."""
    if kind == "1":
        return torch.ones_like(gamma)
    if kind == "gamma2":
        return gamma**2
    if kind == "snr":
        return gamma**2 / (sigma**2).clamp_min(1e-20)
    if kind == "inv1p":
        return 1 / (1 + sigma**2)
    raise LdaeError(
        f"diffusion.loss_weight: unknown weighting {kind!r}; choose one of {', '.join(get_args(LossWeight))}"
    )


class NoiseSchedule(nn.Module):
    """gamma_t, sigma_t and the loss weight lambda_t for t = 0..T as lookup tables (t = 0 is clean)."""

    gamma: torch.Tensor  # buffers
    sigma: torch.Tensor
    weight: torch.Tensor

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.kind, self.T = cfg.schedule, cfg.timesteps
        self.constant_t = cfg.constant_t
        gamma, sigma = schedule_table(cfg.schedule, cfg.timesteps, cfg.constant_sigma)
        self.register_buffer("gamma", gamma.float(), persistent=False)
        self.register_buffer("sigma", sigma.float(), persistent=False)
        self.register_buffer("weight", loss_weights(cfg.loss_weight, gamma, sigma).float(), persistent=False)

    def sample_t(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        if self.kind == "constant":
            return torch.full((n,), self.constant_t, dtype=torch.long, device=device)
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=device)

    def sigma_to_t(self, sigma: float) -> int:
        """The timestep whose noise level is closest to `sigma` (for `denoise --sigma`)."""
        return int((self.sigma - sigma).abs().argmin())


class Denoiser(nn.Module):
    """One training objective: tokenizer + schedule + network -> per-sample loss."""

    def __init__(self, cfg: DiffusionConfig, tokenizer: Tokenizer, schedule: NoiseSchedule, image_size: int):
        super().__init__()
        if cfg.tail_weight != 1.0 and cfg.target == "x0" and not tokenizer.orthonormal:
            raise LdaeError(
                f"diffusion.tail_weight needs a tokenizer with an orthonormal basis (pca or pixel); "
                f"'{tokenizer.kind}' has none: set diffusion.tail_weight=1.0"
            )
        self.cfg, self.tokenizer, self.schedule = cfg, tokenizer, schedule
        self.grid = tokenizer.grid(image_size)
        self.image_size = image_size
        self.amp_dtype: torch.dtype | None = None  # set to torch.bfloat16 for autocast on CUDA

    @property
    def in_dim(self) -> int:
        return self.tokenizer.token_dim if self.cfg.input_space == "latent" else self.tokenizer.image_token_dim

    @property
    def out_dim(self) -> int:
        return self.tokenizer.token_dim if self.cfg.output_space == "latent" else self.tokenizer.image_token_dim

    def to_image_patches(self, z: torch.Tensor) -> torch.Tensor:
        """Latent tokens -> image patches (B, N, D) through the tokenizer's decoder."""
        return self.tokenizer.decode_patches(z, self.grid)

    def to_latent(self, patches: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode_patches(patches, self.grid)

    def noisy_input(self, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, network input)."""
        gamma = self.schedule.gamma[t][:, None, None]
        sigma = self.schedule.sigma[t][:, None, None]
        zt = gamma * z0 + sigma * eps
        return zt, (zt if self.cfg.input_space == "latent" else self.to_image_patches(zt))

    def loss(
        self,
        net: nn.Module,
        images: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        labels: torch.Tensor | None = None,
        drop_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample weighted loss (B,) for images in [-1, 1] with the given timesteps and latent noise."""
        z0 = self.tokenizer.encode(images.float())
        _, net_in = self.noisy_input(z0, t, eps)
        # only the network runs in reduced precision; tokenizer and loss projections stay in float32
        with torch.autocast(
            images.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            out = net(net_in, t, labels, drop_labels)
        out = out.float()
        target = self.cfg.target
        if target == "eps":
            per_token = (eps - out).square().mean(-1)
        elif target == "z0":
            pred = out if self.cfg.output_space == "latent" else self.to_latent(out)
            per_token = (z0 - pred).square().mean(-1)
        else:
            residual = patchify(images.float(), self.tokenizer.patch) - out
            total = residual.square().sum(-1)
            tail = self.cfg.tail_weight
            weighted = total if tail == 1.0 else tail * total + (1 - tail) * self.tokenizer.kept_energy(residual)
            per_token = weighted / residual.shape[-1]
        return self.schedule.weight[t] * per_token.mean(-1)

    @torch.no_grad()
    def denoise(
        self, net: nn.Module, images: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy image, one-step estimate of the clean image) for visualisation and PSNR."""
        z0 = self.tokenizer.encode(images.float())
        zt, net_in = self.noisy_input(z0, t, eps)
        out = net(net_in, t).float()
        noisy = self.tokenizer.decode(zt, self.grid)
        if self.cfg.target == "x0":
            return noisy, unpatchify(out, self.tokenizer.patch, self.grid)
        if self.cfg.target == "z0":
            pred = out if self.cfg.output_space == "latent" else self.to_latent(out)
        else:
            gamma = self.schedule.gamma[t][:, None, None].clamp_min(1e-4)
            sigma = self.schedule.sigma[t][:, None, None]
            pred = (zt - sigma * out) / gamma
        return noisy, self.tokenizer.decode(pred, self.grid)
