"""Pretraining: its step on the Trainer (the objective's draw for the global batch, gradient accumulation over
micro-batches, DDP); the Trainer does the rest (checkpoints, exact resume, EMA, NaN guard, metrics).

Reading path, the files one pretrain step passes through, in order:
1. seeds.py               `SeededSteps` picks the step's images (this rank's share, cut into micro-batches);
2. data/pipeline.py       each image decoded, cropped and resized to uint8 (a DataLoader worker; trainer.ImageStream);
3. train/engine_pretrain  the objective's `draw` (model/objective_base.py) draws the step's randomness for the global
                          batch (`seeds.step_generator`), then `optimizer_step` runs each micro-batch through the
                          objective:
4. model/diffusion.py     l-DAE, `Denoiser.loss`: images to latents (model/tokenizers.py: the PCA encode), noise at
                          level t, the network (model/models.py: `DenoisingViT`), the target and the weighted loss;
                          or model/mae.py, MAE: masking, the encoder on the visible patches, the decoder and the
                          masked-patch loss; or model/mocov3.py, MoCo v3: two views, the base and momentum encoders,
                          the heads and the symmetric InfoNCE loss over the global batch;
5. settings/optim.py      the lr of the step (`StepPlan.lr`), AdamW's update, then the objective's `after_step`
                          (MoCo's momentum update);
6. train/trainer.py       the EMA update, then the cadence: a metrics line, the hooks (train/hooks.py,
                          train/online_probe.py), a checkpoint (train/train_state.py, runs/checkpoint.py) when
                          one is due.

Everything random is keyed by (seed, step), so a resumed run, or the same global batch split over more ranks,
sees exactly the same samples, noise, masks and schedule.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ldae_cli.data.pipeline import ImageDataset
from ldae_cli.model.objective_base import Objective
from ldae_cli.model.tokenizers import PCATokenizer, TokenizerConfig
from ldae_cli.runs.distributed import amp_dtype, no_sync
from ldae_cli.settings.optim import make_adamw, make_ema, plan_steps
from ldae_cli.settings.training import PCA_DIM, PretrainConfig
from ldae_cli.train.hooks import Curve, Curves, Description, LogLine, Pictures
from ldae_cli.train.online_probe import OnlineProbe
from ldae_cli.train.session import Session
from ldae_cli.train.train_state import TrainState
from ldae_cli.train.trainer import Trainer, micro_batches

RESUMABLE = ("optim.micro_batch", "online_probe.")


def optimizer_step(
    runner: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    draw: tuple[torch.Tensor, ...],
    rank_offset: int,
    per_rank: int,
    clip_grad: float | None,
    ddp: bool,
) -> tuple[torch.Tensor, int]:
    """One optimizer step over this rank's micro-batches (on the device); returns (sum of losses, count).

    Micro-batch k takes the rows [rank_offset + k*m, ...) of the global batch's draw (the objective's `draw`);
    the loss is divided by the rank's share so that DDP's gradient average is the global-batch mean.
    """
    loss_sum = torch.zeros((), device=draw[0].device, dtype=torch.float64)
    count, offset = 0, rank_offset
    for k, (images, labels) in enumerate(micro_batches):
        sl = slice(offset, offset + images.shape[0])
        offset += images.shape[0]
        sync = no_sync(runner, ddp and k < len(micro_batches) - 1)
        with sync:
            per_sample = runner(images, labels, *(x[sl] for x in draw))
            (per_sample.sum() / per_rank).backward()
        loss_sum += per_sample.detach().sum()
        count += per_sample.shape[0]
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, count


def train(
    session: Session[PretrainConfig],
    objective: Objective,
    dataset: ImageDataset,
    describe: Callable[[], tuple[dict, dict]],
    parents: list[dict],
    online: OnlineProbe | None = None,
    pictures: Callable[[Trainer], dict[str, torch.Tensor]] | None = None,
) -> bool:
    """Pretrain `objective.net` (and the objective's own modules) on `dataset` with the run's optim settings (and
    the online probe, when given); True when the run reached its last step."""
    cfg, ctx, device = session.cfg, session.ctx, session.ctx.device
    plan = plan_steps(len(dataset), cfg.optim, cfg.run.seed, ctx)
    model = objective.net
    objective.to(device)
    objective.denoiser.amp_dtype = amp_dtype(cfg.run.precision, device)
    optimizer = make_adamw(objective.param_groups(cfg.optim.weight_decay), cfg.optim, device)
    state = TrainState(
        {"model": model, **objective.saved_modules()}, {"optim": optimizer}, make_ema(model, cfg.optim.ema), parents
    )
    hooks = [
        LogLine(),
        Curves(Curve("loss.png", ("loss",), "pretrain loss")),
        Description(describe),
        *([online] if online is not None else []),
        *([Pictures(pictures)] if pictures is not None else []),
    ]
    trainer = Trainer(session, plan, state, hooks)
    runner = trainer.wrap(objective)
    stream = trainer.stream(dataset, cfg.data)
    per_rank = cfg.optim.batch_size // ctx.world

    def step(index: int) -> None:
        draw = objective.draw(cfg.run.seed, index, cfg.optim.batch_size, device)
        batches = [(b.images, b.labels) for b in micro_batches(stream, plan.accum, device)]
        loss_sum, count = optimizer_step(
            runner, model, optimizer, batches, draw, ctx.rank * per_rank, per_rank, cfg.optim.clip_grad, ctx.enabled
        )
        objective.after_step(index, plan.total_steps)  # before the Trainer's EMA and checkpoint
        trainer.meter.add("loss", loss_sum, count)

    trainer.announce(f"{len(dataset):,} images", cfg.optim.base_lr())
    objective.train()
    return trainer.fit(step)


def stand_in(tc: TokenizerConfig) -> PCATokenizer:
    """A PCA tokenizer of the configured shape, to time steps with before the real one is fitted."""
    full = tc.patch**2 * 3
    basis = torch.linalg.qr(torch.randn(full, full, generator=torch.Generator().manual_seed(0)))[0]
    return PCATokenizer(
        torch.zeros(full), basis, torch.ones(full), tc.patch, tc.dim or PCA_DIM, tc.latent_scale, tc.scale_dim
    )


def synthetic_step(cfg: PretrainConfig, objective: Objective, batch: int, device) -> Callable[[], None]:
    """One optimizer step of the run's objective on `batch` random images: what --dry-run times."""
    objective.to(device)
    objective.denoiser.amp_dtype = amp_dtype(cfg.run.precision, device)
    optimizer = make_adamw(objective.param_groups(cfg.optim.weight_decay), cfg.optim, device)
    size = cfg.data.settled_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        objective(images, labels, *objective.draw(cfg.run.seed, 0, batch, device)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(0, 1)

    return step
