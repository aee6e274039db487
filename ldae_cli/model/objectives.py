"""Pretraining objectives, one registry (`OBJECTIVES`, keyed by the config's `objective`) and one factory.

An objective is an nn.Module built from (pretrain config, denoiser, network): `net` is the DenoisingViT whose
encoder every evaluation folds and reads (checkpoint key `model`), `denoiser` its tokenizer and grid. It gives
- `draw(seed, step, batch, device)`: a tuple of tensors whose first dimension is the global batch, the step's
  randomness drawn from `seeds.step_generator(seed, step)`, so any rank count, accumulation or resume sees the same;
- `forward(images, labels, *rows of that draw)`: uint8 images -> per-sample loss (B,), the unit DDP wraps;
- `saved_modules()`: its own trained modules, saved and resumed beside `model` under their own keys;
- `param_groups(weight_decay)`: what AdamW steps;
- `after_step(step, total_steps)`: called after each optimizer step, before the EMA and any checkpoint, so that what
  it updates is saved with the step (MoCo v3's momentum encoder; nothing for the others);
- `net_loaded()`: called when --init-from has put a run of another objective's weights in `net`, so that what the
  objective derives from `net` follows (MoCo v3's momentum encoder starts as the base one; nothing for the others).
engine_pretrain's optimizer_step and the Trainer run every objective the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ldae_cli.data.pipeline import to_unit_range
from ldae_cli.model.diffusion import Denoiser
from ldae_cli.model.mae import MAEObjective
from ldae_cli.model.models import DenoisingViT
from ldae_cli.model.mocov3 import MocoV3Objective
from ldae_cli.seeds import step_generator
from ldae_cli.settings.training import PretrainConfig


class LDAEObjective(nn.Module):
    """l-DAE: images to latents, noise at a random level t, the network's weighted loss (`Denoiser.loss`);
    draw = (timesteps, latent noise, label drops)."""

    def __init__(self, cfg: PretrainConfig, denoiser: Denoiser, net: DenoisingViT):
        super().__init__()
        self.denoiser, self.net = denoiser, net
        self.class_dropout = cfg.model.class_dropout if cfg.model.class_conditional else 0.0

    def draw(self, seed: int, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        gen, den = step_generator(seed, step, device), self.denoiser
        t = den.schedule.sample_t(batch, gen, device)
        eps = torch.randn((batch, den.grid[0] * den.grid[1], den.tokenizer.token_dim), generator=gen, device=device)
        drop = torch.rand(batch, generator=gen, device=device) < self.class_dropout
        return t, eps, drop

    def forward(self, images: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                drop: torch.Tensor) -> torch.Tensor:
        return self.denoiser.loss(self.net, to_unit_range(images), t, eps, labels, drop)

    def saved_modules(self) -> dict[str, nn.Module]:
        return {}

    def param_groups(self, weight_decay: float) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def net_loaded(self) -> None:
        pass


OBJECTIVES: dict[str, type[nn.Module]] = {"ldae": LDAEObjective, "mae": MAEObjective, "mocov3": MocoV3Objective}


def build_objective(cfg: PretrainConfig, denoiser: Denoiser, net: DenoisingViT) -> nn.Module:
    return OBJECTIVES[cfg.objective](cfg, denoiser, net)
