"""ViTDet Mask R-CNN training and COCO evaluation on the Trainer (the model and data are detectron2's, built
in detection.py): AdamW with layer-wise lr decay over the ViT blocks, ViTDet's warm-up + step schedule,
gradient accumulation, DDP, box and mask AP during and after training. The Trainer does checkpoints,
exact resume (a killed final evaluation is redone on resume), NaN guard and metrics.
"""

from __future__ import annotations

from typing import Optional
from dataclasses import dataclass, field
import contextlib
import json
import logging
import warnings
from functools import partial
from pathlib import Path

import torch
from rich.table import Table
from torch import nn

from ldae_cli.config import require
from ldae_cli.errors import LdaeError
from ldae_cli.models import SizeName, check_shape, resolve_size
from ldae_cli.optim import accumulation
from ldae_cli.pretrained import DEFAULT_T
from ldae_cli.rundir import write_atomically
from ldae_cli.seeds import detect_step_seed
from ldae_cli.session import RunConfig
from ldae_cli import detection
from ldae_cli.distributed import DistContext, amp_dtype, barrier
from ldae_cli.hooks import Curve, Curves, Description, Evaluation, LogLine
from ldae_cli.train_state import TrainState
from ldae_cli.trainer import Trainer
from ldae_cli.optim import StepPlan
from ldae_cli.logs import console, progress_bar
from ldae_cli.session import Session


RESUMABLE = ("optim.micro_batch", "eval.every")


@dataclass
class DetectDataConfig:
    path: Optional[str] = None  # COCO root: annotations/instances_<split>.json and one image folder per split
    train_split: str = "train2017"
    eval_split: str = "val2017"
    image_size: int = 1024  # LSJ crop size; test images are resized to this long side
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])  # LSJ ResizeScale range
    num_workers: int = 4

    def validate(self) -> None:
        if self.image_size < 16:
            raise LdaeError(f"data.image_size: must be at least 16, got {self.image_size}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise LdaeError(f"data.scale_range: expected [min, max] with 0 < min <= max, got {self.scale_range}")
        if self.num_workers < 0:
            raise LdaeError(f"data.num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class BackboneConfig:
    # the encoder size this recipe is for; --ckpt must hold it (null: whatever --ckpt holds). Also the
    # architecture of --from-scratch without --ckpt. width/depth/num_heads override the preset.
    size: Optional[SizeName] = None
    width: Optional[int] = None
    depth: Optional[int] = None  # encoder blocks
    num_heads: Optional[int] = None
    patch_size: int = 16  # for --from-scratch without --ckpt (else the checkpoint's)
    pretrain_image_size: int = 256  # likewise; the absolute position embedding is interpolated from it
    t: int = DEFAULT_T  # noise level the adaLN encoder is folded at
    ema: Optional[bool] = None  # fold the EMA weights (null: EMA when the pretrain run kept it)
    drop_path: float = 0.1
    window_size: int = 8  # window attention in every block but the last of each quarter of the depth

    def shape(self) -> tuple[int, int, int] | None:
        """(width, depth, heads) this recipe is for, or None when it follows the checkpoint."""
        if self.size is None:
            return None
        return resolve_size("backbone", self.size, width=self.width, depth=self.depth, num_heads=self.num_heads)

    def validate(self) -> None:
        shape = self.shape()
        if shape:
            check_shape("backbone", shape[0], shape[2])
            require("backbone", "a positive integer", lambda v: v > 0, depth=shape[1])
        require("backbone", "a positive integer", lambda v: v > 0, patch_size=self.patch_size,
                pretrain_image_size=self.pretrain_image_size)
        require("backbone", ">= 0", lambda v: v >= 0, t=self.t)
        if not 0 <= self.drop_path < 1:
            raise LdaeError(f"backbone.drop_path: expected a rate in [0, 1), got {self.drop_path}")
        if self.window_size < 1:
            raise LdaeError(f"backbone.window_size: must be positive, got {self.window_size}")


@dataclass
class DetectModelConfig:
    pyramid_channels: int = 256  # simple-feature-pyramid outputs, RPN and ROI-head convolutions
    box_fc_dim: int = 1024
    roi_batch_per_image: int = 512  # sampled proposals per image for the ROI heads

    def validate(self) -> None:
        require("model", "a positive integer", lambda v: v > 0, pyramid_channels=self.pyramid_channels,
                box_fc_dim=self.box_fc_dim, roi_batch_per_image=self.roi_batch_per_image)


@dataclass
class DetectOptimConfig:
    batch_size: int = 64  # global batch (all ranks, all accumulation steps)
    micro_batch: Optional[int] = None  # per rank per forward; null = batch_size / ranks
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.95  # lr of ViT block i is lr * layer_decay ** (depth - i)
    iterations: int = 184375  # ViTDet's 100 epochs of COCO train2017 at batch 64
    warmup_iterations: int = 250
    warmup_factor: float = 0.001
    lr_steps: list[float] = field(default_factory=lambda: [0.888889, 0.962963])  # fractions; lr x0.1 at each

    def validate(self) -> None:
        if self.batch_size < 1 or self.iterations < 1 or self.warmup_iterations < 0:
            raise LdaeError("optim.batch_size and optim.iterations must be positive, optim.warmup_iterations >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise LdaeError(f"optim.betas needs two values in [0, 1), got {self.betas}")
        if not 0 < self.layer_decay <= 1:
            raise LdaeError(f"optim.layer_decay: expected a factor in (0, 1], got {self.layer_decay}")
        require("optim", "> 0", lambda v: v > 0, lr=self.lr, micro_batch=self.micro_batch)
        require("optim", ">= 0", lambda v: v >= 0, weight_decay=self.weight_decay)
        require("optim", "in (0, 1]", lambda v: 0 < v <= 1, warmup_factor=self.warmup_factor)
        if any(not 0 < f < 1 for f in self.lr_steps) or sorted(set(self.lr_steps)) != list(self.lr_steps):
            raise LdaeError(f"optim.lr_steps: expected increasing fractions of the run in (0, 1), got {self.lr_steps}")
        milestones = self.milestones()
        if milestones and (milestones[0] < 1 or len(set(milestones)) < len(milestones)):
            raise LdaeError(f"optim.lr_steps {self.lr_steps} of {self.iterations} iterations put lr steps at "
                            f"{milestones}; use more optim.iterations or fewer lr_steps")
        if self.warmup_iterations >= self.iterations:
            raise LdaeError(f"optim.warmup_iterations {self.warmup_iterations} is not fewer than optim.iterations "
                            f"{self.iterations}: the lr would never reach its peak; set it below {self.iterations}")
        if milestones and milestones[0] < self.warmup_iterations:
            raise LdaeError(f"optim.lr_steps {self.lr_steps} puts the first lr step at iteration {milestones[0]}, "
                            f"inside the optim.warmup_iterations {self.warmup_iterations}; raise the first step or "
                            "shorten the warm-up")
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise LdaeError(f"optim.micro_batch {self.micro_batch} does not divide optim.batch_size {self.batch_size}; "
                            "use a divisor of it, or null")

    def milestones(self) -> list[int]:
        return [round(f * self.iterations) for f in self.lr_steps]

    def accumulation(self, world: int) -> tuple[int, int]:
        return accumulation(self.batch_size, self.micro_batch, world)

    def lr_schedule(self):
        """ViTDet's schedule as a function of progress in [0, 1): linear warm-up, then x0.1 at each step."""
        from detectron2.solver import WarmupParamScheduler  # detectron2 is imported only where it is used
        from fvcore.common.param_scheduler import MultiStepParamScheduler

        milestones = self.milestones()
        steps = MultiStepParamScheduler(values=[0.1 ** i for i in range(len(milestones) + 1)],
                                        milestones=milestones, num_updates=self.iterations)
        return WarmupParamScheduler(steps, warmup_factor=self.warmup_factor,
                                    warmup_length=min(1.0, self.warmup_iterations / self.iterations))


@dataclass
class DetectEvalConfig:
    every: Optional[int] = None  # iterations between COCO evaluations while training (the end always evaluates)

    def validate(self) -> None:
        require("eval", "a positive number of iterations (or null)", lambda v: v > 0, every=self.every)


@dataclass
class DetectConfig:
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    optim: DetectOptimConfig = field(default_factory=DetectOptimConfig)
    eval: DetectEvalConfig = field(default_factory=DetectEvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.run.compile:
            raise LdaeError("run.compile: detect does not compile (Mask R-CNN has data-dependent shapes); "
                            "set run.compile=false")
        if self.eval.every is not None and self.eval.every > self.optim.iterations:
            raise LdaeError(f"eval.every {self.eval.every} is more than optim.iterations {self.optim.iterations}: no "
                            "evaluation would fall inside the run (the end always evaluates); lower it, or null")

LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@contextlib.contextmanager
def quiet_detectron2():
    """detectron2 and the torch features it calls warn about their own internals on every step; what
    matters (AP, losses, an empty evaluation) this stage reports itself."""
    loggers = [logging.getLogger(name) for name in ("torch.fx._symbolic_trace", "detectron2")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for module in (r"detectron2\..*", r"torch\.functional", r"torch\.jit\..*", r"timm\..*", r"fvcore\..*"):
            warnings.filterwarnings("ignore", module=module)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def build_optimizer(model: nn.Module, optim, depth: int, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over detectron2's parameter groups: layer-wise lr decay over the ViT blocks, no weight decay
    on the ViT's LayerNorms and position embedding (ViTDet's settings). Each group's decayed lr is its
    `lr_scale`: the schedule's multiplier times it is the group's lr at every step."""
    from detectron2.modeling import get_vit_lr_decay_rate
    from detectron2.solver.build import get_default_optimizer_params

    groups = get_default_optimizer_params(
        model, base_lr=optim.lr, weight_decay_norm=0.0, overrides={"pos_embed": {"weight_decay": 0.0}},
        lr_factor_func=partial(get_vit_lr_decay_rate, lr_decay_rate=optim.layer_decay, num_layers=depth))
    for group in groups:
        group["lr_scale"] = group["lr"]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=device.type == "cuda")


def ap_table(results: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    for key in AP_KEYS:
        table.add_column(key, justify="right")
    for task in ("bbox", "segm"):
        row = results.get(task, {})
        table.add_row("box" if task == "bbox" else "mask",
                      *("-" if row.get(k) is None else f"{row[k]:.3f}" for k in AP_KEYS))
    if all(v is None for row in results.values() for v in row.values()):
        table.caption = "no detection scored above 0.05, so COCOeval did not run (in effect AP 0)"
    return table


def flat_results(results: dict) -> dict:
    return {f"{task}_{k}": v for task, row in results.items() for k, v in row.items()}


def run_evaluation(model: nn.Module, split: detection.CocoSplit, cfg, out_dir: Path, ctx: DistContext,
                   bar=None, text: str = "coco_eval.txt") -> dict:
    """COCO AP on `split`, shown as a task of `bar` (the training progress) or of a bar of its own."""
    with contextlib.nullcontext(bar) if bar is not None else \
            progress_bar("img", cfg.run.progress and ctx.is_main) as shown:
        task = shown.add_task(f"eval {cfg.data.eval_split}", total=-(-len(split.dicts) // ctx.world), info="")
        results = detection.evaluate(model, split, cfg.data.image_size, out_dir, ctx.enabled,
                                     cfg.data.num_workers, advance=lambda n: shown.update(task, advance=n), text=text)
        shown.remove_task(task)
    barrier(ctx)
    return results


def train(session: Session[DetectConfig], model: nn.Module, depth: int, train_split: detection.CocoSplit,
          eval_split: detection.CocoSplit, description: dict, parents: list[dict]) -> bool:
    """Train the detector for optim.iterations, evaluating every eval.every iterations and at the end."""
    from detectron2.utils.events import EventStorage  # detectron2's losses log their statistics into one

    cfg, ctx, device = session.cfg, session.ctx, session.ctx.device
    optim, seed = cfg.optim, cfg.run.seed
    micro, accum = optim.accumulation(ctx.world)
    schedule = optim.lr_schedule()
    total = optim.iterations
    records = detection.train_dicts(train_split)
    plan = StepPlan(total, len(records) / optim.batch_size, optim.batch_size, lambda step: schedule(step / total),
                    micro=micro, accum=accum)
    optimizer = build_optimizer(model, optim, depth, device)
    autocast = amp_dtype(cfg.run.precision, device)

    def evaluate_now(step: int) -> dict:
        results = run_evaluation(model, eval_split, cfg, session.out_dir, ctx, trainer.progress)
        model.train()
        if ctx.is_main:
            console.print(ap_table(results, f"COCO {cfg.data.eval_split} at step {step:,}"))
            trainer.metrics.write({"step": step, **flat_results(results)})
            record = json.dumps({"step": step, **results}, indent=1) + "\n"
            write_atomically(session.output("eval.json"), record.encode())
        return results

    every = cfg.eval.every
    hooks = [LogLine(), Curves(Curve("loss.png", ("loss",), "detect loss")), Description(lambda: ({}, dict(description))),
             Evaluation(evaluate_now, every=lambda step: bool(every) and step % every == 0)]
    trainer = Trainer(session, plan, TrainState({"model": model}, {"optim": optimizer}, parents=parents), hooks,
                      losses=("loss",) + LOSSES, hint="Lower optim.lr or check the annotations")
    runner = trainer.wrap(model)  # buffers (pixel statistics, anchors) are constants: not re-broadcast
    batches = iter(detection.train_loader(records, cfg.data.image_size, tuple(cfg.data.scale_range), seed,
                                          optim.batch_size, micro, ctx.rank, ctx.world, trainer.step,
                                          cfg.data.num_workers))

    def step(index: int) -> dict:
        # drop path and proposal sampling draw from torch's RNG: keyed by (seed, step, rank) for exact resume
        torch.manual_seed(detect_step_seed(seed, index, ctx.rank, ctx.world))
        with EventStorage(index):
            for k in range(accum):
                sync = runner.no_sync() if ctx.enabled and k < accum - 1 else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                        loss_dict = runner(next(batches))
                    loss = sum(loss_dict.values())
                    (loss / accum).backward()
                terms = torch.stack([loss] + [loss_dict[name] for name in LOSSES]).detach().double()
                trainer.meter.add_all(terms / accum, 1 / accum)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"lr": optim.lr * schedule(index / total)}

    spec = description["backbone"]
    trainer.announce(f"{len(records):,} training images, {len(train_split.class_names)} classes, "
                     f"{cfg.data.image_size}px LSJ; ViT {spec['width']}x{spec['depth']} (patch {spec['patch_size']}, "
                     f"global blocks {detection.global_block_indexes(spec['depth'])}, window "
                     f"{cfg.backbone.window_size})", optim.lr)
    model.train()
    return trainer.fit(step)
