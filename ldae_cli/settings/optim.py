"""Optimizer settings and the step plan every training stage shares: global batch, accumulation, the
per-step lr schedule, AdamW and the EMA of the weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Optional

from ldae_cli.config import require
from ldae_cli.errors import LdaeError

if TYPE_CHECKING:  # torch and timm load when a run starts, not when its config is read
    import torch
    from timm.utils import ModelEmaV3

    from ldae_cli.seeds import SeededSteps


@dataclass
class OptimConfig:
    batch_size: int = 2048  # global batch (all ranks, all accumulation steps)
    micro_batch: Optional[int] = None  # per rank per forward; null = batch_size / ranks (no accumulation)
    blr: float = 1e-4  # lr = blr * batch_size / 256
    lr: Optional[float] = None  # absolute lr, overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: float = 400.0
    warmup_epochs: float = 100.0
    clip_grad: Optional[float] = None
    ema: Optional[float] = None  # EMA decay of the weights, e.g. 0.9999; null = no EMA

    def validate(self) -> None:
        if self.batch_size < 1:
            raise LdaeError(f"optim.batch_size must be positive, got {self.batch_size}")
        if self.epochs <= 0 or self.warmup_epochs < 0:
            raise LdaeError("optim.epochs must be positive and optim.warmup_epochs non-negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise LdaeError(f"optim.betas needs two values in [0, 1), got {self.betas}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise LdaeError(f"optim.ema is a decay in (0, 1), got {self.ema}")
        require("optim", "a positive integer", lambda v: v > 0, micro_batch=self.micro_batch)
        require("optim", "> 0", lambda v: v > 0, blr=self.blr, lr=self.lr, clip_grad=self.clip_grad)
        require("optim", ">= 0", lambda v: v >= 0, min_lr=self.min_lr, weight_decay=self.weight_decay)
        if not math.isfinite(self.base_lr()):
            raise LdaeError(f"optim: the lr (blr x batch_size / 256, or lr) overflows to {self.base_lr()}; lower it")
        if self.min_lr > self.base_lr():
            raise LdaeError(
                f"optim.min_lr {self.min_lr:g} is above the peak lr {self.base_lr():g} (blr x batch_size / 256,"
                " or lr) that the schedule decays from; lower optim.min_lr"
            )
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise LdaeError(
                f"optim.micro_batch {self.micro_batch} does not divide optim.batch_size {self.batch_size} "
                "(each rank's share is cut into whole micro-batches); use a divisor of it, or null"
            )
        check_warmup("optim.warmup_epochs", self.warmup_epochs, "optim.epochs", self.epochs)

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def accumulation(self, world: int) -> tuple[int, int]:
        return accumulation(self.batch_size, self.micro_batch, world)


def check_warmup(warmup_key: str, warmup: float, run_key: str, run: float) -> None:
    """A warm-up must end before the run does: one as long as the run never reaches the peak lr, nor decays."""
    if warmup and warmup >= run:
        raise LdaeError(
            f"{warmup_key} {warmup:g} is not shorter than {run_key} {run:g}: the lr would never reach its "
            f"peak; set {warmup_key} below {run:g} (e.g. {run / 10:g}) or 0"
        )


def accumulation(batch_size: int, micro_batch: int | None, world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) that make `batch_size` over `world` ranks."""
    per_rank, rem = divmod(batch_size, world)
    if rem:
        raise LdaeError(f"optim.batch_size {batch_size} is not divisible by {world} ranks")
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise LdaeError(f"optim.micro_batch {micro} does not divide the per-rank batch {per_rank}")
    return micro, per_rank // micro


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warm-up then half-cycle cosine to min_lr (MAE/DiT practice)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class StepPlan:
    """How a run is cut into optimizer steps on this rank, and the lr of each step.

    `lr(step)` is the value each optimizer parameter group multiplies by its own `lr_scale` (layer
    decay, one probe head's lr, a detector group's peak lr); without one a group takes it as is.
    """

    total_steps: int
    steps_per_epoch: float
    batch_size: int  # images per optimizer step, all ranks together
    lr: Callable[[int], float]
    batches: SeededSteps | None = None  # this rank's seeded micro-batches, for image datasets
    micro: int = 0
    accum: int = 1


def plan_steps(n_images: int, optim: OptimConfig, seed: int, ctx) -> StepPlan:
    """`optim.epochs` over n images in seeded global batches; warm-up + cosine from `optim.base_lr()`."""
    from ldae_cli.seeds import SeededSteps

    micro, accum = optim.accumulation(ctx.world)
    batches = SeededSteps(n_images, optim.batch_size, seed, ctx.rank, ctx.world, accum)
    per_epoch = batches.steps_per_epoch
    total = max(1, round(optim.epochs * per_epoch))
    schedule = partial(
        lr_at,
        total_steps=total,
        warmup_steps=round(optim.warmup_epochs * per_epoch),
        base_lr=optim.base_lr(),
        min_lr=optim.min_lr,
    )
    return StepPlan(total, per_epoch, optim.batch_size, schedule, batches, micro, accum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_adamw(params, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW at the run's base lr; parameter groups may carry their own weight decay and lr_scale."""
    import torch

    return torch.optim.AdamW(
        params,
        lr=optim.base_lr(),
        betas=(optim.betas[0], optim.betas[1]),
        weight_decay=optim.weight_decay,
        fused=device.type == "cuda",
    )


def make_ema(model: torch.nn.Module, decay: float | None) -> ModelEmaV3 | None:
    """ema <- decay * ema + (1 - decay) * weights after every optimizer step (no warm-up)."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay) if decay else None
