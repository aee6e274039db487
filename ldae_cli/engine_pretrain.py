"""The pretraining loop: seeded global batches, latent noise, gradient accumulation, DDP, EMA,
periodic atomic checkpoints, exact resume, NaN guard, progress and metrics.

Everything random is keyed by (seed, step): the data order by StepBatches, the timesteps, noise
and label drops by a generator re-seeded each step and drawn for the whole global batch (each rank
and micro-batch takes its slice). A resumed run, or the same global batch split over more ranks,
therefore sees exactly the same samples, noise and schedule.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldae_cli.checkpoint import Checkpoint, save_checkpoint
from ldae_cli.data import BadImageCounter, ImageDataset, make_loader, to_unit_range
from ldae_cli.diffusion import Denoiser
from ldae_cli.distributed import DistContext, barrier, ddp_wrap
from ldae_cli.engine import DIVERGED_HINT, LossMeter, OptimConfig, RunConfig, TrainLoop, amp_dtype, \
    finished_already, make_adamw, make_ema, optimizer_tensors, plan_steps, restore_run, set_lr
from ldae_cli.plots import save_curves
from ldae_cli.reporting import MetricsLog, console, read_metrics


class PretrainObjective(nn.Module):
    """uint8 images + step noise -> per-sample loss; the unit DDP and torch.compile wrap."""

    def __init__(self, denoiser: Denoiser, net: nn.Module):
        super().__init__()
        self.denoiser, self.net = denoiser, net

    def forward(self, images: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor,
                drop: torch.Tensor) -> torch.Tensor:
        return self.denoiser.loss(self.net, to_unit_range(images), t, eps, labels, drop)


@dataclass
class StepNoise:
    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor


def draw_step_noise(denoiser: Denoiser, seed: int, step: int, batch: int, class_dropout: float,
                    device: torch.device) -> StepNoise:
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    n_tokens = denoiser.grid[0] * denoiser.grid[1]
    t = denoiser.schedule.sample_t(batch, gen, device)
    eps = torch.randn((batch, n_tokens, denoiser.tokenizer.token_dim), generator=gen, device=device)
    drop = torch.rand(batch, generator=gen, device=device) < class_dropout
    return StepNoise(t, eps, drop)


def optimizer_step(runner: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: list[tuple[torch.Tensor, torch.Tensor]], noise: StepNoise, rank_offset: int,
                   per_rank: int, clip_grad: float | None, ddp: bool) -> tuple[torch.Tensor, int]:
    """One optimizer step over this rank's micro-batches (on the device); returns (sum of losses, count).

    Micro-batch k takes the noise rows [rank_offset + k*m, ...) of the global batch's draw; the loss
    is divided by the rank's share so that DDP's gradient average is the global-batch mean.
    """
    loss_sum = torch.zeros((), device=noise.eps.device, dtype=torch.float64)
    count, offset = 0, rank_offset
    for k, (images, labels) in enumerate(micro_batches):
        sl = slice(offset, offset + images.shape[0])
        offset += images.shape[0]
        sync = runner.no_sync() if ddp and k < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync:
            per_sample = runner(images, noise.t[sl], noise.eps[sl], labels, noise.drop[sl])
            (per_sample.sum() / per_rank).backward()
        loss_sum += per_sample.detach().sum()
        count += per_sample.shape[0]
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, count


@dataclass
class PretrainJob:
    """Everything the loop needs, built by the pretrain stage."""

    denoiser: Denoiser
    model: nn.Module
    dataset: ImageDataset
    optim: OptimConfig
    run: RunConfig
    out_dir: Path
    checkpoint_payload: callable  # (model, ema) -> (tensors, extra) describing the model for the checkpoint
    config: dict
    parents: list[dict] = field(default_factory=list)
    class_dropout: float = 0.0
    num_workers: int = 2
    on_bad_image: str = "error"
    resume_from: Checkpoint | None = None


def train(job: PretrainJob, ctx: DistContext) -> Path:
    device = ctx.device
    cfg_o, cfg_r = job.optim, job.run
    plan = plan_steps(len(job.dataset), cfg_o, cfg_r.seed, ctx)
    batches, micro, accum, base_lr = plan.batches, plan.micro, plan.accum, plan.base_lr
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps

    model = job.model.to(device)
    job.denoiser.to(device)
    job.denoiser.amp_dtype = amp_dtype(cfg_r.precision, device)
    objective = PretrainObjective(job.denoiser, model)
    runner: nn.Module = objective
    if ctx.enabled:
        runner = ddp_wrap(objective, ctx)
    if cfg_r.compile:
        runner = torch.compile(runner)
    optimizer = make_adamw(model.parameters(), cfg_o, device)
    ema = make_ema(model, cfg_o.ema)
    start_step = restore_run(job.resume_from, ctx, total_steps,
                             {"model": model, "ema": ema.module if ema is not None else None}, optimizer)
    metrics = MetricsLog(job.out_dir / "metrics.jsonl", ctx.is_main,
                         truncate_after_step=start_step if job.resume_from is not None else None)

    def save(step_done: int) -> Path:
        path = job.out_dir / "checkpoint.safetensors"
        if ctx.is_main:
            tensors, extra = job.checkpoint_payload(model, ema)
            opt_tensors, opt_rest = optimizer_tensors(optimizer)
            tensors.update(opt_tensors)
            extra.update(step=step_done, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                         epoch=step_done / steps_per_epoch, finished=step_done == total_steps, optimizer=opt_rest,
                         world_size=ctx.world)
            save_checkpoint(path, "pretrain", tensors, job.config, job.parents, extra)
            save_curves(read_metrics(metrics.path), job.out_dir / "loss.png", ("loss",),
                        title=f"pretrain loss ({job.out_dir.name})")
        barrier(ctx)
        return path

    if finished_already(start_step, total_steps, ctx):
        return job.out_dir / "checkpoint.safetensors"

    batches.start_step, batches.total_steps = start_step, total_steps
    data_iter = iter(make_loader(job.dataset, batches, job.num_workers, pin_memory=device.type == "cuda"))
    bad = BadImageCounter(job.on_bad_image)
    per_rank = cfg_o.batch_size // ctx.world
    meter = LossMeter(("loss",), device)
    if ctx.is_main:
        console.print(f"pretrain: {len(job.dataset):,} images, batch {cfg_o.batch_size} ({ctx.world} rank(s) x "
                      f"{accum} x {micro}), {total_steps:,} steps ({cfg_o.epochs:g} epochs), lr {base_lr:.3g}, "
                      f"device {device}")
    model.train()
    with TrainLoop("pretrain", cfg_r, job.out_dir, ctx, start_step, total_steps, steps_per_epoch,
                   cfg_o.batch_size) as loop:
        while loop.running:
            lr = plan.lr(loop.step)
            set_lr(optimizer, lr)
            noise = draw_step_noise(job.denoiser, cfg_r.seed, loop.step, cfg_o.batch_size, job.class_dropout, device)
            micro_batches = []
            for _ in range(accum):
                batch = bad.check(next(data_iter))
                micro_batches.append((batch.images.to(device, non_blocking=True),
                                      batch.labels.to(device, non_blocking=True)))
            step_loss, step_count = optimizer_step(runner, model, optimizer, micro_batches, noise,
                                                   ctx.rank * per_rank, per_rank, cfg_o.clip_grad, ctx.enabled)
            meter.add("loss", step_loss, step_count)
            if ema is not None:
                ema.update(model, step=loop.step)
            if loop.end_step(metrics, meter, DIVERGED_HINT, save, lr=lr, skipped_images=bad.skipped):
                break
    if ctx.is_main and not loop.running:
        console.print(f"finished {total_steps:,} steps in {loop.seconds:.0f}s; wrote "
                      f"{job.out_dir / 'checkpoint.safetensors'} and {job.out_dir / 'loss.png'}")
    return job.out_dir / "checkpoint.safetensors"
