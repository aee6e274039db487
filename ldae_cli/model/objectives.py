"""Pretraining objectives: one registry (`OBJECTIVES`, keyed by the config's `objective`), l-DAE's objective and
one factory. What an objective provides: model/objective_base.py's `Objective`."""

from __future__ import annotations

import torch

from ldae_cli.data.pipeline import to_unit_range
from ldae_cli.model.diffusion import Denoiser
from ldae_cli.model.mae import MAEObjective
from ldae_cli.model.mocov3 import MocoV3Objective
from ldae_cli.model.models import DenoisingViT
from ldae_cli.model.objective_base import Objective
from ldae_cli.seeds import step_generator
from ldae_cli.settings.training import PretrainConfig


class LDAEObjective(Objective):
    """l-DAE: images to latents, noise at a random level t, the network's weighted loss (`Denoiser.loss`);
    draw = (timesteps, latent noise, label drops)."""

    def __init__(self, cfg: PretrainConfig, denoiser: Denoiser, net: DenoisingViT):
        super().__init__(cfg, denoiser, net)
        self.class_dropout = cfg.model.class_dropout if cfg.model.class_conditional else 0.0

    def draw(self, seed: int, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        gen, den = step_generator(seed, step, device), self.denoiser
        t = den.schedule.sample_t(batch, gen, device)
        eps = torch.randn((batch, den.grid[0] * den.grid[1], den.tokenizer.token_dim), generator=gen, device=device)
        drop = torch.rand(batch, generator=gen, device=device) < self.class_dropout
        return t, eps, drop

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, drop: torch.Tensor
    ) -> torch.Tensor:
        return self.denoiser.loss(self.net, to_unit_range(images), t, eps, labels, drop)

    def param_groups(self, weight_decay: float) -> list[torch.nn.Parameter]:
        return list(self.net.parameters())


OBJECTIVES: dict[str, type[Objective]] = {"ldae": LDAEObjective, "mae": MAEObjective, "mocov3": MocoV3Objective}


def build_objective(cfg: PretrainConfig, denoiser: Denoiser, net: DenoisingViT) -> Objective:
    return OBJECTIVES[cfg.objective](cfg, denoiser, net)
