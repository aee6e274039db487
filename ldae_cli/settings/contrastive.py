"""MoCo v3's settings, the `mocov3:` section of a pretrain config read when `objective: mocov3` (Chen, Xie, He 2021;
facebookresearch/moco-v3's ViT recipe), free of torch like the other config sections: model/mocov3.py reads them.
The defaults are the paper's ViT settings. MoCo has no timestep: like MAE's, its encoder is trained and folded at
settings.training.DEFAULT_T."""

from __future__ import annotations

from dataclasses import dataclass, field

from ldae_cli.config import require
from ldae_cli.errors import LdaeError


@dataclass
class MocoV3Config:
    temperature: float = 0.2  # tau of the InfoNCE loss (the official --moco-t for ViTs)
    momentum: float = 0.99  # m0 of the momentum encoder, raised to 1 along a half cosine when momentum_cosine
    momentum_cosine: bool = True
    mlp_dim: int = 4096  # hidden width of the projection and prediction MLPs
    dim: int = 256  # output width of both MLPs
    proj_layers: int = 3
    pred_layers: int = 2
    freeze_patch_embed: bool = True  # the random patch projection stays at its init (the paper's stability fix)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random resized crop's area range
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur's sigma range, pixels

    def validate(self) -> None:
        require("mocov3", "> 0", lambda v: v > 0, temperature=self.temperature, mlp_dim=self.mlp_dim, dim=self.dim)
        require("mocov3", "in [0, 1]", lambda v: 0 <= v <= 1, momentum=self.momentum)
        require("mocov3", ">= 1", lambda v: v >= 1, proj_layers=self.proj_layers, pred_layers=self.pred_layers)
        if len(self.crop_scale) != 2 or not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise LdaeError(f"mocov3.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if len(self.blur_sigma) != 2 or not (0 < self.blur_sigma[0] <= self.blur_sigma[1]):
            raise LdaeError(f"mocov3.blur_sigma: expected [min, max] with 0 < min <= max, got {self.blur_sigma}")
