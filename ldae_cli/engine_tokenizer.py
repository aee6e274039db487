"""The tokenizer training loop: reconstruction + KL (+ perceptual, + adversarial) with the engine's
conventions: seeded global batches, per-step seeded posterior noise, gradient accumulation over
micro-batches, several ranks, periodic atomic checkpoints holding both optimizers, exact resume,
NaN guard, progress bar and metrics.jsonl.

Losses are means per image value: LDM's per-image sums divided by 3HW, with KL divided the same way,
so LDM's weights (kl 1e-6, perceptual 1, discriminator 0.5) mean here what they mean there. The
adversarial term uses VQGAN's adaptive weight ||grad nll|| / ||grad g|| at the decoder's last layer,
computed per micro-batch on each rank (as taming-transformers does per GPU).

Ranks average gradients by one all-reduce per model and step rather than DDP: the adaptive weight
needs `autograd.grad` through the decoder, and the discriminator runs twice per step (real, fake).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from ldae_cli.checkpoint import Checkpoint, save_checkpoint
from ldae_cli.data import BadImageCounter, ImageDataset, make_loader, to_unit_range
from ldae_cli.distributed import DistContext, barrier
from ldae_cli.engine import DIVERGED_HINT, LossMeter, OptimConfig, RunConfig, TrainLoop, amp_dtype, \
    finished_already, make_adamw, optimizer_tensors, plan_steps, restore_optimizer, restore_run, set_lr
from ldae_cli.errors import LdaeError
from ldae_cli.plots import save_curves
from ldae_cli.reporting import MetricsLog, console, read_metrics
from ldae_cli.trained_tokenizers import Autoencoder, PatchDiscriminator, PerceptualLoss, hinge_d_loss

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class LossConfig:
    reconstruction: Literal["l1", "l2"] = "l2"
    kl_weight: float = 1e-6  # VAEs only (LDM's KL-f8 value); patch-ae has no KL and needs 0
    perceptual_weight: float = 0.0  # LPIPS-style VGG16 loss; > 0 needs loss.vgg_weights
    vgg_weights: Optional[str] = None  # torchvision VGG16 state dict as .safetensors (user-supplied)
    lpips_weights: Optional[str] = None  # LPIPS's learned channel weights as .safetensors; null = uniform
    adversarial_weight: float = 0.0  # VQGAN's disc_weight; 0 = no discriminator
    disc_start: int = 0  # optimizer step at which the discriminator and the adversarial term switch on
    disc_layers: int = 3
    disc_channels: int = 64

    def validate(self) -> None:
        if min(self.kl_weight, self.perceptual_weight, self.adversarial_weight) < 0:
            raise LdaeError("loss.kl_weight, loss.perceptual_weight and loss.adversarial_weight must be >= 0")
        if self.perceptual_weight > 0 and not self.vgg_weights:
            raise LdaeError(f"loss.perceptual_weight is {self.perceptual_weight:g} but loss.vgg_weights is empty: "
                            f"the perceptual loss needs VGG16 weights (a torchvision VGG16 state dict saved as "
                            f".safetensors; none is downloaded); set loss.vgg_weights=PATH or loss.perceptual_weight=0")
        if self.disc_start < 0 or self.disc_layers < 1 or self.disc_channels < 1:
            raise LdaeError("loss.disc_start must be >= 0, loss.disc_layers and loss.disc_channels positive")


class TokenizerObjective(nn.Module):
    """The autoencoder with its loss terms; one instance per process."""

    def __init__(self, net: Autoencoder, cfg: LossConfig):
        super().__init__()
        if cfg.kl_weight > 0 and not net.variational:
            raise LdaeError(f"tokenizer.kind '{net.spec['kind']}' has no KL term: set loss.kl_weight=0 "
                            "(or use a VAE kind)")
        self.net, self.cfg = net, cfg
        self.perceptual = PerceptualLoss(cfg.vgg_weights, cfg.lpips_weights) if cfg.perceptual_weight > 0 else None
        self.disc = PatchDiscriminator(cfg.disc_layers, cfg.disc_channels) if cfg.adversarial_weight > 0 else None
        self.amp_dtype: torch.dtype | None = None

    def adversarial(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.disc_start

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def generator_loss(self, images: torch.Tensor, noise: torch.Tensor, step: int
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(loss, per-term values, detached reconstruction) for one micro-batch."""
        cfg = self.cfg
        with self._autocast(images.device):
            recon, mean, logvar = self.net(images, noise)
        recon = recon.float()
        diff = images - recon
        mse = diff.square().mean()
        nll = diff.abs().mean() if cfg.reconstruction == "l1" else mse
        terms = {"mse": mse.detach()}
        if self.perceptual is not None:
            with self._autocast(images.device):
                p = self.perceptual(images, recon).float().mean()
            nll = nll + cfg.perceptual_weight * p
            terms["perceptual"] = p.detach()
        loss = nll
        if logvar is not None:
            mean, logvar = mean.float(), logvar.float()
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean() / images[0].numel()
            loss = loss + cfg.kl_weight * kl
            terms["kl"] = kl.detach()
        if self.adversarial(step):
            self.disc.requires_grad_(False)  # the generator's loss must not train the discriminator
            with self._autocast(images.device):
                g = -self.disc(recon).float().mean()
            weight = self.adaptive_weight(nll, g)
            loss = loss + weight * g
            terms.update(g=g.detach(), d_weight=weight)
        return loss, terms, recon.detach()

    def adaptive_weight(self, nll: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """VQGAN: scale the GAN gradient at the last decoder layer to the reconstruction gradient's norm."""
        last = self.net.last_layer
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.cfg.adversarial_weight

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        self.disc.requires_grad_(True)
        with self._autocast(images.device):
            real, fake = self.disc(images), self.disc(recon)
        return hinge_d_loss(real.float(), fake.float())


def average_gradients(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Mean of each gradient over ranks, in one flat all-reduce."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


@dataclass
class TokenizerJob:
    objective: TokenizerObjective
    dataset: ImageDataset
    optim: OptimConfig
    run: RunConfig
    out_dir: Path
    config: dict
    # called once on the main rank after the last step: (tensors, extra) added to the final checkpoint
    finalize: Callable[[Autoencoder], tuple[dict[str, torch.Tensor], dict]]
    num_workers: int = 2
    on_bad_image: str = "error"
    resume_from: Checkpoint | None = None
    extra: dict = field(default_factory=dict)  # stored in every checkpoint (the tokenizer spec, image size)


def draw_posterior_noise(net: Autoencoder, seed: int, step: int, batch: int, grid: tuple[int, int],
                         device: torch.device) -> torch.Tensor:
    """The global batch's posterior samples, keyed by (seed, step) so resumes and rank counts agree."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    return torch.randn((batch, grid[0] * grid[1], net.token_dim), generator=gen, device=device)


def train(job: TokenizerJob, ctx: DistContext) -> Path:
    device = ctx.device
    cfg_o, cfg_r = job.optim, job.run
    objective = job.objective.to(device)
    objective.amp_dtype = amp_dtype(cfg_r.precision, device)
    net, disc = objective.net, objective.disc
    plan = plan_steps(len(job.dataset), cfg_o, cfg_r.seed, ctx)
    batches, micro, accum, base_lr = plan.batches, plan.micro, plan.accum, plan.base_lr
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    grid = net.grid(job.dataset.size)
    compile_settings = contextlib.nullcontext()
    if cfg_r.compile:
        net.compile()  # in place: state dict keys stay those of the plain module
        if disc is not None:
            # the adaptive weight differentiates the compiled decoder twice (retain_graph=True), which
            # torch's donated backward buffers forbid; this is the switch its error message names
            compile_settings = torch._functorch.config.patch(donated_buffer=False)

    optimizer = make_adamw(net.parameters(), cfg_o, device)
    disc_optimizer = make_adamw(disc.parameters(), cfg_o, device) if disc is not None else None
    ck = job.resume_from
    start_step = restore_run(ck, ctx, total_steps, {"net": net, "disc": disc}, optimizer)
    if ck is not None and ck.extra.get("optimizer_disc"):  # absent until the discriminator has taken a step
        restore_optimizer(disc_optimizer, ck.section("optim_disc"), ck.extra["optimizer_disc"])
    path = job.out_dir / CHECKPOINT
    if finished_already(start_step, total_steps, ctx):
        return path

    metrics = MetricsLog(job.out_dir / "metrics.jsonl", ctx.is_main,
                         truncate_after_step=start_step if job.resume_from is not None else None)

    def save(step_done: int) -> None:
        finished = step_done == total_steps
        if ctx.is_main:
            tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
            t, opt_rest = optimizer_tensors(optimizer)
            tensors.update(t)
            extra = {**job.extra, "step": step_done, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                     "epoch": step_done / steps_per_epoch, "finished": finished, "optimizer": opt_rest,
                     "optimizer_disc": None, "world_size": ctx.world}
            if disc is not None:
                tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
                if disc_optimizer.state:
                    t, extra["optimizer_disc"] = optimizer_tensors(disc_optimizer, "optim_disc")
                    tensors.update(t)
            if finished:
                final_tensors, final_extra = job.finalize(net)
                tensors.update(final_tensors)
                extra.update(final_extra)
            save_checkpoint(path, "tokenizer", tensors, job.config, extra=extra)
            save_curves(read_metrics(metrics.path), job.out_dir / "loss.png", ("loss", "mse"),
                        title=f"train-tokenizer ({job.out_dir.name})")
        barrier(ctx)

    batches.start_step, batches.total_steps = start_step, total_steps
    data_iter = iter(make_loader(job.dataset, batches, job.num_workers, pin_memory=device.type == "cuda"))
    bad = BadImageCounter(job.on_bad_image)
    per_rank = cfg_o.batch_size // ctx.world
    meter = LossMeter(("loss", "mse", "kl", "perceptual", "g", "d_weight", "d_loss"), device)  # each term averaged over the micro-batches that computed it
    if ctx.is_main:
        console.print(f"train-tokenizer: {net.spec['kind']} p={net.patch} d={net.token_dim}, "
                      f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params; {len(job.dataset):,} images, "
                      f"batch {cfg_o.batch_size} ({ctx.world} rank(s) x {accum} x {micro}), {total_steps:,} steps "
                      f"({cfg_o.epochs:g} epochs), lr {base_lr:.3g}, device {device}")
    objective.train()
    with TrainLoop("train-tokenizer", cfg_r, job.out_dir, ctx, start_step, total_steps, steps_per_epoch,
                   cfg_o.batch_size, shown=("loss", "mse", "lr")) as loop, compile_settings:
        while loop.running:
            step = loop.step
            lr = plan.lr(step)
            set_lr(optimizer, lr)
            adversarial = objective.adversarial(step)
            if adversarial:
                set_lr(disc_optimizer, lr)
            noise = draw_posterior_noise(net, cfg_r.seed, step, cfg_o.batch_size, grid, device)
            offset = ctx.rank * per_rank
            for _ in range(accum):
                images = to_unit_range(bad.check(next(data_iter)).images.to(device, non_blocking=True))
                sl = slice(offset, offset + images.shape[0])
                offset += images.shape[0]
                share = images.shape[0] / per_rank  # micro-batch means -> the rank's batch mean
                loss, terms, recon = objective.generator_loss(images, noise[sl], step)
                (loss * share).backward()
                terms["loss"] = loss.detach()
                if adversarial:
                    d_loss = objective.discriminator_loss(images, recon)
                    (d_loss * share).backward()
                    terms["d_loss"] = d_loss.detach()
                for name, value in terms.items():
                    meter.add(name, value.double())
            for params, opt in ((list(net.parameters()), optimizer),
                                (list(disc.parameters()) if adversarial else [], disc_optimizer)):
                if not params:
                    continue
                average_gradients(params, ctx)
                if cfg_o.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, cfg_o.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if loop.end_step(metrics, meter, DIVERGED_HINT, save, lr=lr, skipped_images=bad.skipped):
                break
    if ctx.is_main and not loop.running:
        console.print(f"finished {total_steps:,} steps in {loop.seconds:.0f}s; wrote {path}")
    return path
