"""Tokenizer training on the Trainer: reconstruction + KL (+ perceptual, + adversarial), per-step seeded
posterior noise, gradient accumulation over micro-batches, several ranks; the Trainer does the
checkpoints (holding both optimizers), exact resume, NaN guard, progress and metrics.

Losses are means per image value: LDM's per-image sums divided by 3HW, with KL divided the same way,
so LDM's weights (kl 1e-6, perceptual 1, discriminator 0.5) mean here what they mean there. The
adversarial term uses VQGAN's adaptive weight ||grad nll|| / ||grad g|| at the decoder's last layer,
computed per micro-batch on each rank (as taming-transformers does per GPU).

Ranks average gradients by one all-reduce per model and step rather than DDP: the adaptive weight
needs `autograd.grad` through the decoder, and the discriminator runs twice per step (real, fake).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ldae_cli.data.pipeline import ImageDataset, to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.model.autoencoders import Autoencoder, PatchDiscriminator, PerceptualLoss, hinge_d_loss
from ldae_cli.runs.distributed import DistContext, amp_dtype
from ldae_cli.seeds import step_generator
from ldae_cli.settings.optim import make_adamw, plan_steps
from ldae_cli.settings.training import LossConfig, TrainTokenizerConfig
from ldae_cli.train.hooks import Curve, Curves, Description, LogLine
from ldae_cli.train.session import Session
from ldae_cli.train.train_state import TrainState
from ldae_cli.train.trainer import Trainer, micro_batches

RESUMABLE = ("optim.micro_batch",)


class TokenizerObjective(nn.Module):
    """The autoencoder with its loss terms; one instance per process."""

    def __init__(self, net: Autoencoder, cfg: LossConfig):
        super().__init__()
        if cfg.kl_weight > 0 and not net.variational:
            raise LdaeError(
                f"tokenizer.kind '{net.spec['kind']}' has no KL term: set loss.kl_weight=0 (or use a VAE kind)"
            )
        self.net, self.cfg = net, cfg
        self.perceptual: PerceptualLoss | None = None
        if cfg.perceptual_weight > 0:
            assert cfg.vgg_weights is not None  # LossConfig.validate requires it
            self.perceptual = PerceptualLoss(cfg.vgg_weights, cfg.lpips_weights)
        self.disc = PatchDiscriminator(cfg.disc_layers, cfg.disc_channels) if cfg.adversarial_weight > 0 else None
        self.amp_dtype: torch.dtype | None = None

    def adversarial(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.disc_start

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def generator_loss(
        self, images: torch.Tensor, noise: torch.Tensor, step: int
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
            assert self.disc is not None  # adversarial() says there is one
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
        assert self.disc is not None  # called at adversarial() steps only
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
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def draw_posterior_noise(
    net: Autoencoder, seed: int, step: int, batch: int, grid: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """The global batch's posterior samples, keyed by (seed, step) so resumes and rank counts agree."""
    gen = step_generator(seed, step, device)
    return torch.randn((batch, grid[0] * grid[1], net.token_dim), generator=gen, device=device)


def train(
    session: Session[TrainTokenizerConfig],
    objective: TokenizerObjective,
    dataset: ImageDataset,
    finalize: Callable[[Autoencoder], tuple[dict[str, torch.Tensor], dict]],
    description: dict,
) -> bool:
    """Train the autoencoder (and its discriminator); `finalize(net)` runs once on the main rank after the last
    step and adds its (tensors, extra) to the final checkpoint. True when the run reached its last step."""
    cfg, ctx, device = session.cfg, session.ctx, session.ctx.device
    objective.to(device)
    objective.amp_dtype = amp_dtype(cfg.run.precision, device)
    net, disc = objective.net, objective.disc
    plan = plan_steps(len(dataset), cfg.optim, cfg.run.seed, ctx)
    grid = net.grid(dataset.size)
    compile_settings = contextlib.nullcontext()
    if cfg.run.compile:
        net.compile()  # in place: state dict keys stay those of the plain module
        if disc is not None:
            # the adaptive weight differentiates the compiled decoder twice (retain_graph=True), which
            # torch's donated backward buffers forbid; this is the switch its error message names
            compile_settings = torch._functorch.config.patch(donated_buffer=False)
    optimizers: dict[str, torch.optim.Optimizer] = {"optim": make_adamw(net.parameters(), cfg.optim, device)}
    if disc is not None:
        optimizers["optim_disc"] = make_adamw(disc.parameters(), cfg.optim, device)
    final: list = []  # finalize's output, computed once

    def describe() -> tuple[dict, dict]:
        if trainer.step < trainer.total_steps:
            return {}, dict(description)
        if not final:
            final.extend(finalize(net))
        return dict(final[0]), {**description, **final[1]}

    hooks = [
        LogLine(("loss", "mse", "lr")),
        Curves(Curve("loss.png", ("loss", "mse"), "train-tokenizer")),
        Description(describe),
    ]
    trainer = Trainer(
        session,
        plan,
        TrainState({"net": net, "disc": disc}, optimizers),
        hooks,
        losses=("loss", "mse", "kl", "perceptual", "g", "d_weight", "d_loss"),
    )
    stream = trainer.stream(dataset, cfg.data)
    per_rank = cfg.optim.batch_size // ctx.world

    def step(index: int) -> None:
        adversarial = objective.adversarial(index)
        noise = draw_posterior_noise(net, cfg.run.seed, index, cfg.optim.batch_size, grid, device)
        offset = ctx.rank * per_rank
        for batch in micro_batches(stream, plan.accum, device):
            images = to_unit_range(batch.images)
            sl = slice(offset, offset + images.shape[0])
            offset += images.shape[0]
            share = images.shape[0] / per_rank  # micro-batch means -> the rank's batch mean
            loss, terms, recon = objective.generator_loss(images, noise[sl], index)
            (loss * share).backward()
            terms["loss"] = loss.detach()
            if adversarial:
                d_loss = objective.discriminator_loss(images, recon)
                (d_loss * share).backward()
                terms["d_loss"] = d_loss.detach()
            for name, value in terms.items():  # each term averaged over the micro-batches that computed it
                trainer.meter.add(name, value.double())
        stepped = [(net, optimizers["optim"])] + (
            [(disc, optimizers["optim_disc"])] if adversarial and disc is not None else []
        )
        for module, optimizer in stepped:
            params = list(module.parameters())
            average_gradients(params, ctx)
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    trainer.announce(
        f"{net.spec['kind']} p={net.patch} d={net.token_dim}, "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params; {len(dataset):,} images",
        cfg.optim.base_lr(),
    )
    objective.train()
    with compile_settings:
        return trainer.fit(step)
