"""`--dry-run` and `--print-config`: what a training command would do, checked and planned, before any work.

A dry run reads the config, settles the data (kind, splits, size: file listings, no image decoded), checks the
output folder the way a start would (without writing), plans the steps and the batch split, counts the network's
parameters and the memory its weights, gradients, optimizer state and EMA take, and estimates the run's time from
the network's FLOPs and the rate a transformer MLP of its width trains at on the chosen device, timed now
(seconds, whatever the network's size). Nothing is written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from rich.table import Table

from ldae_cli.config import dump_yaml
from ldae_cli.data.discovery import check_splits
from ldae_cli.data.sources import open_source
from ldae_cli.runs import rundir
from ldae_cli.runs.checkpoint import Checkpoint
from ldae_cli.runs.logs import clock, console
from ldae_cli.settings.optim import StepPlan, plan_steps
from ldae_cli.settings.training import PCA_DIM
from ldae_cli.train.session import kept_config


def print_config(cfg) -> None:
    """The resolved config as YAML on stdout (plain text, so it can be saved and passed back with --config)."""
    sys.stdout.write(dump_yaml(cfg))


def world_size() -> int:
    """The ranks a torchrun launch of this command would have (1 for a plain command)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Plan:
    command: str
    out_dir: Path
    start: str  # what happens in out_dir: a new run, the same run started again, a continued one, ...
    images: int  # training images
    batch: int  # global batch
    ranks: int
    accum: int
    micro: int
    steps: int
    steps_per_epoch: float
    lr: float
    params: int
    state_bytes: int  # weights, gradients, optimizer state and EMA (activations come on top)
    seconds_per_image: float | None = None  # one rank, estimated or measured
    timing: str = ""  # how the time was measured, or why it was not
    notes: list[str] = field(default_factory=list)
    work_images: int | None = None  # images the timed work runs on over the run (default: steps x batch)
    image_size: int | None = None  # the side the images are read at (data.image_size, settled)

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def show(self) -> None:
        table = Table(title=f"ldae {self.command} --dry-run (nothing was written)", show_header=False)
        table.add_column(justify="right", style="bold")
        table.add_column()
        rows = [
            ("run directory", f"{self.out_dir}: {self.start}"),
            (
                "data",
                f"{self.images:,} training images"
                + (f" at {self.image_size}x{self.image_size}" if self.image_size else ""),
            ),
            (
                "plan",
                f"{self.steps:,} steps = {self.epochs:g} epoch{'' if self.epochs == 1 else 's'} of "
                f"{self.steps_per_epoch:g} steps",
            ),
            ("batch", f"{self.batch:,} global = {self.ranks} rank(s) x {self.accum} accumulation x {self.micro}"),
            ("peak lr", f"{self.lr:.3g}"),
            ("network", f"{self.params / 1e6:,.2f}M parameters"),
            (
                "memory",
                f"{size(self.state_bytes)} for weights, gradients, optimizer state and EMA (activations on top)",
            ),
        ]
        if self.seconds_per_image is not None:
            total = self.seconds_per_image * (self.work_images or self.steps * self.batch) / self.ranks
            rows.append(
                ("time", f"about {clock(total)} ({1 / self.seconds_per_image:,.1f} img/s per rank; {self.timing})")
            )
        else:
            rows.append(("time", self.timing))
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
        for note in self.notes:
            console.print(note)


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


def start_of(
    out_dir: Path,
    command: str,
    kind: str,
    force: bool,
    resume_step: int | None = None,
    keep: frozenset[str] | set[str] = frozenset(),
    restartable=None,
) -> str:
    """What a start would do in `out_dir`, decided as `rundir.claim` decides, without writing; refusals raise."""
    if resume_step is not None:
        return f"continues the run at step {resume_step:,}"
    if not out_dir.exists():
        return "a new run (the folder is created)"
    if not out_dir.is_dir():
        rundir.resolve(command, kind, str(out_dir), None, None)  # raises: a file, not a run directory
    action, ours = rundir.decide(out_dir, command, force, keep, restartable, kind=kind)
    return {
        "empty": "a new run in the empty folder",
        "restart": "the same run, stopped before its first checkpoint, started again",
        "replace": f"replaces the earlier run ({len(ours)} file(s) ldae wrote there)",
    }[action]


@dataclass
class Outline:
    """What every training stage's --dry-run settles before its own part: where the run would go and what a start
    there would do, the training data and the step plan at this launch's world size."""

    out_dir: Path
    start: str
    source: Any  # the training split, opened (its images are not read)
    images: int
    steps: StepPlan
    world: int
    micro: int
    accum: int

    def plan(
        self, command: str, cfg, params: int, seconds_per_image: float | None, timing: str, notes: Sequence[str] = ()
    ) -> Plan:
        """The stage's plan: this outline, the network's `params` with AdamW state (and EMA), and the timing."""
        return Plan(
            command,
            self.out_dir,
            self.start,
            self.images,
            cfg.optim.batch_size,
            self.world,
            self.accum,
            self.micro,
            self.steps.total_steps,
            self.steps.steps_per_epoch,
            cfg.optim.base_lr(),
            params,
            state_bytes(params, 2, cfg.optim.ema is not None),
            seconds_per_image,
            timing,
            list(notes),
            image_size=cfg.data.image_size,
        )


def outline(
    cfg,
    command: str,
    kind: str,
    name: str | None,
    config_file: str | None,
    resume: Checkpoint | None,
    force: bool,
    splits: list[str],
    restartable=None,
) -> Outline:
    """The run directory (`name` names a new one under runs/), the start it would get, the splits present, and the
    steps over the training images; refusals raise as a start's would."""
    world = world_size()
    micro, accum = cfg.optim.accumulation(world)
    out_dir = rundir.resolve(command, kind, cfg.run.out_dir, name, resume.path if resume else None)
    start = start_of(
        out_dir,
        command,
        kind,
        force,
        resume.extra["step"] if resume else None,
        kept_config(config_file, out_dir),
        restartable,
    )
    check_splits(cfg.data, splits)
    source = open_source(cfg.data, "train")
    images = min(len(source), cfg.data.limit or len(source))
    if cfg.data.image_size and getattr(source, "stored_size", None) is None:  # the warning a start gives
        from ldae_cli.data.pipeline import upsampling

        warning = upsampling(cfg.data, source, cfg.data.image_size)
        if warning:
            console.print(warning)
    steps = plan_steps(images, cfg.optim, cfg.run.seed, SimpleNamespace(rank=0, world=world))
    return Outline(out_dir, start, source, images, steps, world, micro, accum)


def seconds_per_image(step: Callable[[], object], images: int, repeats: int = 3) -> float:
    """The median time of `step` (one optimizer step on `images` synthetic images) per image, after a warm-up."""
    import torch

    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] / images


def state_bytes(params: int, optimizer_slots: int = 2, ema: bool = False) -> int:
    """fp32 weights and gradients, AdamW's two moments (or another optimizer's slots), and the EMA copy."""
    return params * 4 * (2 + optimizer_slots + (1 if ema else 0))


def network_spec(cfg) -> dict:
    """The shape of a pretrain config's network, as `DenoisingViT.spec` holds it, without building it (a trained
    tokenizer's token is taken as tokenizer.patch pixels wide)."""
    tc, (width, enc, dec, heads) = cfg.tokenizer, cfg.model.resolved()
    pixels = tc.patch**2 * 3
    latent = pixels if tc.kind == "pixel" else tc.dim or PCA_DIM
    side = cfg.data.image_size // tc.patch
    return dict(
        in_dim=latent if cfg.diffusion.input_space == "latent" else pixels,
        grid=[side, side],
        width=width,
        out_dim=latent if cfg.diffusion.output_space == "latent" else pixels,
        encoder_depth=enc,
        decoder_depth=dec,
        num_heads=heads,
        mlp_ratio=cfg.model.mlp_ratio,
    )


def mlp_macs(layers: int, in_dim: int, hidden: int, out_dim: int) -> int:
    """Multiply-adds of one sample through an MLP head of `layers` Linears (in -> hidden ... hidden -> out)."""
    dims = [in_dim, *[hidden] * (layers - 1), out_dim]
    return sum(a * b for a, b in zip(dims, dims[1:]))


def training_flops_per_image(cfg) -> float:
    """Matmul FLOPs one training image costs under a pretrain config's objective, forward and backward: what every
    estimate of a pretrain's time (--dry-run, a study's) scales by.
    - ldae: every token through the encoder and decoder (models.model_flops_per_image);
    - mae: the encoder on the visible tokens, then MAE's decoder on every token (its input Linear counted there);
    - mocov3: two views through the base encoder, projector and predictor (forward and backward) and through the
      momentum encoder and projector (forward only); the logits against the batch's keys (dim x batch multiply-adds
      a query) are left out."""
    from ldae_cli.model.models import model_flops_per_image

    spec = network_spec(cfg)
    tokens = spec["grid"][0] * spec["grid"][1]
    encoder = {**spec, "decoder_depth": 0, "out_dim": 0}
    if cfg.objective == "mae":
        m = cfg.mae
        decoder = {
            **spec,
            "width": m.decoder_width,
            "encoder_depth": m.decoder_depth,
            "decoder_depth": 0,
            "in_dim": spec["width"],
        }
        return model_flops_per_image(encoder, int(tokens * (1 - m.mask_ratio))) + model_flops_per_image(decoder)
    if cfg.objective == "mocov3":
        m = cfg.mocov3
        projector = mlp_macs(m.proj_layers, spec["width"], m.mlp_dim, m.dim)
        predictor = mlp_macs(m.pred_layers, m.dim, m.mlp_dim, m.dim)
        base = model_flops_per_image(encoder) + 2.0 * 3 * (projector + predictor)
        return 2 * (base + model_flops_per_image(encoder, training=False) + 2.0 * projector)
    return model_flops_per_image(spec)


def mlp_flops_per_second(rows: int, width: int, hidden: int, device, dtype, seconds: float = 0.3) -> float:
    """The matmul FLOPs per second a transformer MLP (LayerNorm, width -> hidden, GELU, hidden -> width) trains at on
    `device` now, forward and backward on `rows` tokens: its matmuls at a network's own sizes, with the memory-bound
    work between them that a bare matmul would leave out (on a CPU that work costs narrow networks 3-4x)."""
    import torch
    from torch import nn

    mlp = nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
    ).to(device, dtype)
    x = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)

    def step() -> None:
        mlp(x).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: first-call allocations and kernel selection
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        step()
        runs += 1
    return runs * 3 * 4 * rows * width * hidden / (time.perf_counter() - started)


def estimate_images_per_second(cfg) -> tuple[float, str]:
    """Training images per second on this machine for a pretrain config (its image size settled), from the network's
    FLOPs and the rate a transformer MLP of its width trains at on the run's device now, and the sentence saying what
    that assumes."""
    import torch

    from ldae_cli.runs.distributed import amp_dtype, resolve_device

    device = resolve_device(cfg.run.device)
    dtype = amp_dtype(cfg.run.precision, device) or torch.float32
    spec = network_spec(cfg)
    width, hidden, tokens = spec["width"], int(spec["width"] * spec["mlp_ratio"]), spec["grid"][0] * spec["grid"][1]
    # a micro-batch's tokens, fewer where one step would take more than a fraction of a second (2**34 FLOPs on a CPU)
    affordable = 2 ** (40 if device.type == "cuda" else 34) // (12 * width * hidden)
    rows = max(1, min(tokens * (cfg.optim.micro_batch or cfg.optim.batch_size), 4096, max(256, affordable)))
    speed, flops = mlp_flops_per_second(rows, width, hidden, device, dtype), training_flops_per_image(cfg)
    return speed / flops, (
        f"estimated: {flops / 1e9:,.3g} GFLOP per training image (the matmuls of its objective, "
        f"{cfg.objective}, forward and backward) at the {speed / 1e9:,.0f} GFLOP/s a {width}-wide transformer MLP "
        f"trained at on {rows} tokens ({str(dtype).removeprefix('torch.')}, {device}) now; attention's "
        "softmax, the optimizer step, data loading, the online probe and checkpoints come on top"
    )
