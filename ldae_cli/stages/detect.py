"""`ldae detect`: COCO detection and instance segmentation with detectron2's ViTDet Mask R-CNN (SPEC §5).

The backbone is detectron2's plain `ViT` initialised from our encoder folded at fixed t, under a
`SimpleFeaturePyramid`; training uses large-scale jitter, layer-wise lr decay, AdamW and ViTDet's
warm-up + step schedule; evaluation is COCO box and mask AP. Our YAML config is the user-facing
recipe; detectron2's LazyConfig is built from it (ldae_cli/detection.py). The detector is saved in the
shared safetensors format (kind `detect`) with its optimizer state, so runs resume exactly.

Several GPUs or nodes: `torchrun --nproc-per-node N -m ldae_cli detect ...` (optim.batch_size stays the
global batch; optim.micro_batch splits each rank's share when it does not fit in memory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
from rich.table import Table
from torch import nn

from ldae_cli import detection
from ldae_cli.checkpoint import Checkpoint, load_checkpoint, read_metadata, save_checkpoint, sha256_file
from ldae_cli.config import load_config, save_resolved, to_dict
from ldae_cli.distributed import DistContext, barrier, ddp_wrap, init, shutdown
from ldae_cli.engine import LossMeter, RunConfig, TrainLoop, accumulation, amp_dtype, check_resume_config, \
    open_run_dir, optimizer_tensors, restore_run
from ldae_cli.errors import LdaeError
from ldae_cli.models import SIZES
from ldae_cli.plots import save_curves
from ldae_cli.pretrained import DEFAULT_T, load_encoder
from ldae_cli.reporting import MetricsLog, console, progress_bar, read_metrics
from ldae_cli.stages.pretrain import CHECKPOINT, resolve_resume

# keys a resumed run may change: where things are and how they are run, not what is computed
RESUMABLE_CHANGES = ("data.path", "data.num_workers", "run.device", "run.log_every", "run.save_every",
                     "run.time_limit_minutes", "run.stop_after_steps", "run.progress", "run.out_dir",
                     "optim.micro_batch", "eval.every")
LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
    size: Optional[Literal["T", "S", "B", "half-L", "L", "custom"]] = None
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
        preset = SIZES.get(self.size, (None, None, None, None))
        values = (self.width or preset[0], self.depth or preset[1], self.num_heads or preset[3])
        if None in values:
            raise LdaeError("backbone.size 'custom' needs backbone.width, backbone.depth and backbone.num_heads")
        return values

    def validate(self) -> None:
        shape = self.shape()
        if shape and shape[0] % shape[2]:
            raise LdaeError(f"backbone.width {shape[0]} is not divisible by backbone.num_heads {shape[2]}")
        if not 0 <= self.drop_path < 1:
            raise LdaeError(f"backbone.drop_path: expected a rate in [0, 1), got {self.drop_path}")
        if self.window_size < 1:
            raise LdaeError(f"backbone.window_size: must be positive, got {self.window_size}")


@dataclass
class DetectModelConfig:
    pyramid_channels: int = 256  # simple-feature-pyramid outputs, RPN and ROI-head convolutions
    box_fc_dim: int = 1024
    roi_batch_per_image: int = 512  # sampled proposals per image for the ROI heads


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
        if len(self.betas) != 2:
            raise LdaeError(f"optim.betas needs two values, got {self.betas}")
        if not 0 < self.layer_decay <= 1:
            raise LdaeError(f"optim.layer_decay: expected a factor in (0, 1], got {self.layer_decay}")
        if any(not 0 < f < 1 for f in self.lr_steps) or sorted(set(self.lr_steps)) != list(self.lr_steps):
            raise LdaeError(f"optim.lr_steps: expected increasing fractions of the run in (0, 1), got {self.lr_steps}")
        milestones = self.milestones()
        if milestones and (milestones[0] < 1 or len(set(milestones)) < len(milestones)):
            raise LdaeError(f"optim.lr_steps {self.lr_steps} of {self.iterations} iterations put lr steps at "
                            f"{milestones}; use more optim.iterations or fewer lr_steps")

    def milestones(self) -> list[int]:
        return [round(f * self.iterations) for f in self.lr_steps]

    def accumulation(self, world: int) -> tuple[int, int]:
        return accumulation(self.batch_size, self.micro_batch, world)

    def lr_schedule(self):
        """ViTDet's schedule as a function of progress in [0, 1): linear warm-up, then x0.1 at each step."""
        from detectron2.solver import WarmupParamScheduler
        from fvcore.common.param_scheduler import MultiStepParamScheduler

        milestones = self.milestones()
        steps = MultiStepParamScheduler(values=[0.1 ** i for i in range(len(milestones) + 1)],
                                        milestones=milestones, num_updates=self.iterations)
        return WarmupParamScheduler(steps, warmup_factor=self.warmup_factor,
                                    warmup_length=min(1.0, self.warmup_iterations / self.iterations))


@dataclass
class DetectEvalConfig:
    every: Optional[int] = None  # iterations between COCO evaluations while training (the end always evaluates)


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


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def run_from_cli(config: str | None, overrides: list[str], flags: dict, resume: str | None, *,
                 ckpt: str | None, from_scratch: bool, eval_only: bool) -> Path:
    with quiet_detectron2():
        detection.require_detectron2()
        return _dispatch(config, overrides, flags, resume, ckpt, from_scratch, eval_only)


def _dispatch(config: str | None, overrides: list[str], flags: dict, resume: str | None, ckpt: str | None,
              from_scratch: bool, eval_only: bool) -> Path:
    if eval_only:
        if resume or from_scratch:
            raise LdaeError("--eval-only evaluates --ckpt (a trained detect checkpoint); it takes neither "
                            "--resume nor --from-scratch")
        if not ckpt:
            raise LdaeError("--eval-only needs --ckpt, a `detect` checkpoint (e.g. runs/detect/<name>/"
                            f"{CHECKPOINT})")
        trained = load_checkpoint(ckpt, "detect")
        # results go next to the checkpoint (wherever it is now) unless --out says otherwise
        base = {**trained.config, "run": {**trained.config["run"], "out_dir": None}}
        cfg = load_config(DetectConfig, config, overrides, flags, base=base)
        return evaluate_checkpoint(cfg, trained)
    if resume:
        stored = load_checkpoint(resolve_resume(resume), "detect")
        # limits of the interrupted invocation do not carry over; give them again if wanted
        base = {**stored.config, "run": {**stored.config["run"], "stop_after_steps": None,
                                         "time_limit_minutes": None}}
        cfg = load_config(DetectConfig, config, overrides, flags, base=base)
        check_resume_config(stored.config, to_dict(cfg), RESUMABLE_CHANGES)
        _check_resume_init(stored, ckpt, from_scratch)
        return train(cfg, config, None, resume_ckpt=stored)
    cfg = load_config(DetectConfig, config, overrides, flags)
    if not ckpt and not from_scratch:
        raise LdaeError("detect needs --ckpt PRETRAIN (a pretrain checkpoint or an exported encoder), or "
                        "--from-scratch for the randomly initialised baseline")
    if ckpt and read_metadata(ckpt)["kind"] == "detect":
        raise LdaeError(f"{ckpt}: is a 'detect' checkpoint; evaluate it with --eval-only or continue its run with "
                        "--resume RUN_DIR; training starts from a 'pretrain' or 'encoder' checkpoint")
    return train(cfg, config, Init(ckpt, from_scratch))


@dataclass
class Init:
    ckpt: str | None  # pretrain / encoder checkpoint (with from_scratch: only its architecture is used)
    from_scratch: bool


def _check_resume_init(stored: Checkpoint, ckpt: str | None, from_scratch: bool) -> None:
    """--ckpt / --from-scratch on a resume may repeat the original command, but not change it."""
    was_scratch = stored.extra["init"] == "scratch"
    if from_scratch != was_scratch and (from_scratch or ckpt):
        raise LdaeError(f"--resume: {stored.path} was started {'--from-scratch' if was_scratch else 'from --ckpt'}; "
                        "resume without changing that (or leave out --ckpt/--from-scratch)")
    parents = stored.provenance.get("parents", [])
    if ckpt and not was_scratch and parents:
        if sha256_file(ckpt) != parents[0]["sha256"]:
            raise LdaeError(f"--resume: {stored.path} was trained from {parents[0]['path']}, not {ckpt}; leave out "
                            "--ckpt when resuming")


# ---------------------------------------------------------------------------------------------
# Building the detector
# ---------------------------------------------------------------------------------------------

def settings(cfg: DetectConfig, num_classes: int) -> detection.DetectorSettings:
    return detection.DetectorSettings(
        image_size=cfg.data.image_size, num_classes=num_classes, drop_path=cfg.backbone.drop_path,
        window_size=cfg.backbone.window_size, pyramid_channels=cfg.model.pyramid_channels,
        box_fc_dim=cfg.model.box_fc_dim, roi_batch_per_image=cfg.model.roi_batch_per_image)


def resolve_backbone(cfg: DetectConfig, init: Init
                     ) -> tuple[detection.BackboneSpec, dict[str, torch.Tensor] | None, list[dict]]:
    """(ViT shape, folded encoder weights or None for a random start, provenance parents)."""
    b = cfg.backbone
    if init.ckpt is None:
        shape = b.shape()
        if shape is None:
            raise LdaeError("--from-scratch without --ckpt builds the ViT from the config, but backbone.size is "
                            "null; set backbone.size (T, S, B, half-L, L, or custom with width/depth/num_heads)")
        width, depth, heads = shape
        return detection.BackboneSpec(width, depth, heads, b.patch_size, b.pretrain_image_size), None, []
    vit, kwargs, source = load_encoder(init.ckpt, t=b.t, ema=b.ema)
    spec = detection.BackboneSpec.from_timm_kwargs(kwargs, init.ckpt)
    wanted = b.shape()
    if wanted is not None and wanted != (spec.width, spec.depth, spec.num_heads):
        raise LdaeError(f"{init.ckpt}: holds an encoder of width {spec.width}, {spec.depth} blocks, {spec.num_heads} "
                        f"heads, but this config is for backbone.size {b.size} ({wanted[0]}, {wanted[1]} blocks, "
                        f"{wanted[2]} heads); pick the matching configs/detect file or --set backbone.size=null")
    if init.from_scratch:
        return spec, None, []
    role = "pretrain" if source.kind == "pretrain" else "encoder"
    return spec, vit.state_dict(), [source.parent_ref(role)]


def register_splits(cfg: DetectConfig) -> tuple[detection.CocoSplit, detection.CocoSplit]:
    if not cfg.data.path:
        raise LdaeError("data.path is not set; give --data COCO_ROOT (annotations/instances_<split>.json and "
                        "one image folder per split)")
    train_split = detection.register_coco_split(cfg.data.path, cfg.data.train_split)
    eval_split = detection.register_coco_split(cfg.data.path, cfg.data.eval_split)
    if train_split.class_names != eval_split.class_names:
        raise LdaeError(f"{eval_split.json_file}: its categories differ from {train_split.json_file}'s; both "
                        "splits must share one category list")
    return train_split, eval_split


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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, cfg: DetectOptimConfig, depth: int, device: torch.device
                    ) -> torch.optim.Optimizer:
    """AdamW over detectron2's parameter groups: layer-wise lr decay over the ViT blocks, no weight decay
    on the ViT's LayerNorms and position embedding (ViTDet's settings)."""
    from detectron2.modeling import get_vit_lr_decay_rate
    from detectron2.solver.build import get_default_optimizer_params

    groups = get_default_optimizer_params(
        model, base_lr=cfg.lr, weight_decay_norm=0.0, overrides={"pos_embed": {"weight_decay": 0.0}},
        lr_factor_func=partial(get_vit_lr_decay_rate, lr_decay_rate=cfg.layer_decay, num_layers=depth))
    for group in groups:
        group["peak_lr"] = group["lr"]  # the schedule multiplies each group's own (decayed) lr
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
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


def run_evaluation(model: nn.Module, split: detection.CocoSplit, cfg: DetectConfig, out_dir: Path,
                   ctx: DistContext, bar=None) -> dict:
    """COCO AP on `split`, shown as a task of `bar` (the training progress) or of a bar of its own."""
    with contextlib.nullcontext(bar) if bar is not None else \
            progress_bar("img", cfg.run.progress and ctx.is_main) as shown:
        task = shown.add_task(f"eval {cfg.data.eval_split}", total=-(-len(split.dicts) // ctx.world), info="")
        results = detection.evaluate(model, split, cfg.data.image_size, out_dir, ctx.enabled,
                                     cfg.data.num_workers, advance=lambda n: shown.update(task, advance=n))
        shown.remove_task(task)
    barrier(ctx)
    return results


def train(cfg: DetectConfig, config_name: str | None, init_spec: Init | None,
          resume_ckpt: Checkpoint | None = None) -> Path:
    ctx = init(cfg.run.device)
    try:
        return _train(cfg, config_name, init_spec, resume_ckpt, ctx)
    finally:
        shutdown(ctx)


def _train(cfg: DetectConfig, config_name: str | None, init_spec: Init | None, resume_ckpt: Checkpoint | None,
           ctx: DistContext) -> Path:
    from detectron2.utils.events import EventStorage  # detectron2's losses log their statistics into one

    device = ctx.device
    out_dir = open_run_dir("detect", "detect", cfg.run.out_dir, config_name, resume_ckpt, CHECKPOINT)
    ckpt_path = out_dir / CHECKPOINT
    if resume_ckpt is not None:
        spec = detection.BackboneSpec(**resume_ckpt.extra["backbone"])
        encoder_state, parents = None, resume_ckpt.provenance.get("parents", [])
        start_kind, report = resume_ckpt.extra["init"], resume_ckpt.extra.get("load_report")
    else:
        spec, encoder_state, parents = resolve_backbone(cfg, init_spec)
        start_kind, report = ("scratch" if encoder_state is None else "pretrain"), None
    train_split, eval_split = register_splits(cfg)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out_dir / "config.yaml")

    torch.manual_seed(cfg.run.seed)  # detector init: identical on every rank
    model = detection.build_detector(spec, settings(cfg, len(train_split.class_names)))
    if encoder_state is not None:
        loaded = detection.load_encoder_into(model, encoder_state, init_spec.ckpt)
        report = loaded.to_dict()
        if ctx.is_main:
            console.print(loaded.summary())
            (out_dir / "load_report.json").write_text(json.dumps(report, indent=1) + "\n")
    model.to(device)

    cfg_o, cfg_r = cfg.optim, cfg.run
    micro, accum = cfg_o.accumulation(ctx.world)
    total_steps = cfg_o.iterations
    schedule = cfg_o.lr_schedule()
    optimizer = build_optimizer(model, cfg_o, spec.depth, device)
    autocast_dtype = amp_dtype(cfg_r.precision, device)
    runner: nn.Module = model
    if ctx.enabled:
        # buffers (pixel statistics, anchors) are constants: no per-forward sync (ViTDet's setting)
        runner = ddp_wrap(model, ctx)

    start_step = restore_run(resume_ckpt, ctx, total_steps, {"model": model}, optimizer)
    latest_eval = resume_ckpt.extra.get("eval") if resume_ckpt is not None else None

    metrics = MetricsLog(out_dir / "metrics.jsonl", ctx.is_main,
                         truncate_after_step=start_step if resume_ckpt is not None else None)
    train_records = detection.train_dicts(train_split)
    images_per_epoch = len(train_records)

    def save(step_done: int, eval_results: dict | None) -> None:
        if ctx.is_main:
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            opt_tensors, opt_rest = optimizer_tensors(optimizer)
            tensors.update(opt_tensors)
            extra = {"backbone": spec.to_dict(), "num_classes": len(train_split.class_names),
                     "class_names": train_split.class_names, "image_size": cfg.data.image_size,
                     "init": start_kind, "load_report": report, "step": step_done, "total_steps": total_steps,
                     "finished": step_done >= total_steps, "epoch": step_done * cfg_o.batch_size / images_per_epoch,
                     "optimizer": opt_rest, "world_size": ctx.world, "eval": eval_results}
            save_checkpoint(ckpt_path, "detect", tensors, to_dict(cfg), parents, extra)
            save_curves(read_metrics(metrics.path), out_dir / "loss.png", ("loss",),
                        title=f"detect loss ({out_dir.name})")
        barrier(ctx)

    def evaluate_now(step_done: int, bar=None) -> dict:
        results = run_evaluation(model, eval_split, cfg, out_dir, ctx, bar)
        if ctx.is_main:
            console.print(ap_table(results, f"COCO {cfg.data.eval_split} at step {step_done:,}"))
            metrics.write({"step": step_done, **flat_results(results)})
            (out_dir / "eval.json").write_text(json.dumps({"step": step_done, **results}, indent=1) + "\n")
        return {"step": step_done, **results}

    if start_step >= total_steps:
        if latest_eval is None or latest_eval.get("step") != total_steps:  # finished, but its evaluation was cut off
            save(total_steps, evaluate_now(total_steps))
        elif ctx.is_main:
            console.print("this run has already finished and been evaluated; nothing to do")
        return ckpt_path

    loader = detection.train_loader(train_records, cfg.data.image_size,
                                    tuple(cfg.data.scale_range), cfg_r.seed, cfg_o.batch_size, micro, ctx.rank,
                                    ctx.world, start_step, cfg.data.num_workers)
    data_iter = iter(loader)
    if ctx.is_main:
        console.print(f"detect: {images_per_epoch:,} training images, {len(train_split.class_names)} classes, "
                      f"{cfg.data.image_size}px LSJ; ViT {spec.width}x{spec.depth} (patch {spec.patch_size}, global "
                      f"blocks {detection.global_block_indexes(spec.depth)}, window {cfg.backbone.window_size}); "
                      f"batch {cfg_o.batch_size} ({ctx.world} rank(s) x {accum} x {micro}), {total_steps:,} steps, "
                      f"lr {cfg_o.lr:g}, device {device}")
    meter = LossMeter(("loss",) + LOSSES, device)
    model.train()
    with TrainLoop("detect", cfg_r, out_dir, ctx, start_step, total_steps, images_per_epoch / cfg_o.batch_size,
                   cfg_o.batch_size) as loop:
        while loop.running:
            step = loop.step
            lr_mult = schedule(step / total_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_mult
            # drop path and proposal sampling draw from torch's RNG: keyed by (seed, step, rank) for exact resume
            torch.manual_seed(cfg_r.seed * 1_000_003 + step * ctx.world + ctx.rank)
            with EventStorage(step):
                for k in range(accum):
                    batch = next(data_iter)
                    sync = runner.no_sync() if ctx.enabled and k < accum - 1 else contextlib.nullcontext()
                    with sync:
                        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                            enabled=autocast_dtype is not None):
                            loss_dict = runner(batch)
                        loss = sum(loss_dict.values())
                        (loss / accum).backward()
                    terms = torch.stack([loss] + [loss_dict[name] for name in LOSSES]).detach().double()
                    meter.add_all(terms / accum, 1 / accum)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            due_eval = step + 1 == total_steps or (cfg.eval.every and (step + 1) % cfg.eval.every == 0)
            loop.advance(save_now=due_eval)
            step = loop.step
            if loop.due_log:
                loop.log(metrics, meter, "Lower optim.lr or check the annotations", lr=cfg_o.lr * lr_mult)
            if due_eval and step < total_steps:
                latest_eval = evaluate_now(step, loop.progress)
                model.train()
            if loop.due_save:
                save(step, latest_eval)
                loop.saved()
            if step == total_steps:  # saved first, so a failed evaluation loses no training
                latest_eval = evaluate_now(step, loop.progress)
                save(step, latest_eval)
            if loop.stopped():
                break
    if ctx.is_main and not loop.running:
        console.print(f"finished {total_steps:,} steps in {loop.seconds:.0f}s; wrote {ckpt_path}, "
                      f"{out_dir / 'eval.json'} and {out_dir / 'metrics.jsonl'}")
    return ckpt_path


# ---------------------------------------------------------------------------------------------
# Evaluation only
# ---------------------------------------------------------------------------------------------

def evaluate_checkpoint(cfg: DetectConfig, trained: Checkpoint) -> Path:
    """COCO AP of a trained detector on data.eval_split; writes eval.json next to it (or in run.out_dir)."""
    ctx = init(cfg.run.device)
    try:
        out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else trained.path.parent
        if not cfg.data.path:
            raise LdaeError("data.path is not set; give --data COCO_ROOT")
        split = detection.register_coco_split(cfg.data.path, cfg.data.eval_split)
        if split.class_names != trained.extra["class_names"]:
            raise LdaeError(f"{split.json_file}: its {len(split.class_names)} categories differ from the "
                            f"{trained.extra['num_classes']} the detector {trained.path} was trained on")
        spec = detection.BackboneSpec(**trained.extra["backbone"])
        model = detection.build_detector(spec, settings(cfg, trained.extra["num_classes"]))
        model.load_state_dict(trained.section("model"))
        model.to(ctx.device)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        results = run_evaluation(model, split, cfg, out_dir, ctx)
        if ctx.is_main:
            console.print(ap_table(results, f"COCO {cfg.data.eval_split}: {trained.path}"))
            record = {"checkpoint": str(trained.path), "sha256": trained.sha256, "step": trained.extra["step"],
                      **results}
            (out_dir / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
        return out_dir / "eval.json"
    finally:
        shutdown(ctx)
