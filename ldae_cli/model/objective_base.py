"""What every pretraining objective is: `Objective`, the base class of model/objectives.py's registry entries (here,
below mae.py and mocov3.py, which the registry imports).

An objective is an nn.Module built from (pretrain config, denoiser, network): `net` is the DenoisingViT whose
encoder every evaluation folds and reads (checkpoint key `model`), `denoiser` its tokenizer and grid. It gives
- `draw(seed, step, batch, device)`: a tuple of tensors whose first dimension is the global batch, the step's
  randomness drawn from `seeds.step_generator(seed, step)`, so any rank count, accumulation or resume sees the same;
- `forward(images, labels, *rows of that draw)`: uint8 images -> per-sample loss (B,), the unit DDP wraps (each
  objective names its own draw's rows, so it is not declared here);
- `saved_modules()`: its own trained modules, saved and resumed beside `model` under their own keys;
- `param_groups(weight_decay)`: what AdamW steps;
- `after_step(step, total_steps)`: called after each optimizer step, before the EMA and any checkpoint, so that what
  it updates is saved with the step (MoCo v3's momentum encoder);
- `net_loaded()`: called when --init-from has put a run of another objective's weights in `net`, so that what the
  objective derives from `net` follows (MoCo v3's momentum encoder starts as the base one).
engine_pretrain's optimizer_step and the Trainer run every objective the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ldae_cli.model.diffusion import Denoiser
from ldae_cli.model.models import DenoisingViT
from ldae_cli.settings.training import PretrainConfig


class Objective(nn.Module, ABC):
    """The interface above; by default an objective saves nothing of its own and does nothing after a step or a
    --init-from load."""

    denoiser: Denoiser
    net: DenoisingViT

    def __init__(self, cfg: PretrainConfig, denoiser: Denoiser, net: DenoisingViT):
        super().__init__()
        self.denoiser, self.net = denoiser, net

    @abstractmethod
    def draw(self, seed: int, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The step's randomness for the global batch (rows sliced per rank)."""

    @abstractmethod
    def param_groups(self, weight_decay: float) -> list[nn.Parameter] | list[dict]:
        """What AdamW steps: parameters, or groups of them with their own weight decay."""

    def saved_modules(self) -> dict[str, nn.Module]:
        return {}

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def net_loaded(self) -> None:
        pass
