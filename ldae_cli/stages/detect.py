"""`ldae detect`: COCO detection and instance segmentation with detectron2's ViTDet Mask R-CNN (the paper's COCO protocol).

The backbone is detectron2's plain `ViT` initialised from our encoder folded at fixed t, under a
`SimpleFeaturePyramid`; training uses large-scale jitter, layer-wise lr decay, AdamW and ViTDet's
warm-up + step schedule; evaluation is COCO box and mask AP. Our YAML config is the user-facing
recipe; detectron2's LazyConfig is built from it (ldae_cli/detection.py). The detector is saved in the
shared safetensors format (kind `detect`) with its optimizer state, so runs resume exactly.

Several GPUs or nodes: `torchrun --nproc-per-node N -m ldae_cli detect ...` (optim.batch_size stays the
global batch; optim.micro_batch splits each rank's share when it does not fit in memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ldae_cli import detection, engine_detect
from ldae_cli.checkpoint import Checkpoint, load_checkpoint, load_state, read_metadata, sha256_file
from ldae_cli.distributed import init, shutdown
from ldae_cli.engine_detect import ap_table, quiet_detectron2, run_evaluation
from ldae_cli.errors import LdaeError
from ldae_cli.config import load_config, require
from ldae_cli.models import SizeName, check_shape, resolve_size
from ldae_cli.optim import accumulation
from ldae_cli.pretrained import DEFAULT_T, load_encoder
from ldae_cli.reporting import console
from ldae_cli.rundir import refuse_to_replace
from ldae_cli import rundir
from ldae_cli.dryrun import Plan, print_config, start_of, state_bytes, world_size
from ldae_cli.runs import CHECKPOINT, RunConfig, kept_config, load_run_config, session

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


def dry_run(cfg: DetectConfig, config_name: str | None, stored: Checkpoint | None, force: bool, init: Init) -> Plan:
    """--dry-run: the checks and plan of a start (COCO splits, backbone, detector size); the step time is not
    estimated (Mask R-CNN's cost depends on the images' instances)."""
    world = world_size()
    micro, accum = cfg.optim.accumulation(world)
    out_dir = rundir.resolve("detect", "detect", cfg.run.out_dir, config_name, stored.path if stored else None)
    start = start_of(out_dir, "detect", "detect", force, stored.extra["step"] if stored else None,
                     kept_config(config_name, out_dir))
    train_split, _ = register_splits(cfg)
    spec = detection.BackboneSpec(**stored.extra["backbone"]) if stored is not None else resolve_backbone(cfg, init)[0]
    model = detection.build_detector(spec, settings(cfg, len(train_split.class_names)))
    params = sum(p.numel() for p in model.parameters())
    images = len(train_split.dicts)
    return Plan("detect", out_dir, start, images, cfg.optim.batch_size, world, accum, micro, cfg.optim.iterations,
                images / cfg.optim.batch_size, cfg.optim.lr, params, state_bytes(params), None,
                "not estimated for detect: time a few iterations with --set run.stop_after_steps=20")


def main(config: str | None, overrides: list[str], flags: dict, resume: str | None = None, *,
         ckpt: str | None = None, from_scratch: bool = False, eval_only: bool = False, force: bool = False,
         cont: bool = False, preview: str | None = None) -> Path | None:
    with quiet_detectron2():
        detection.require_detectron2()
        if eval_only:
            return _eval_only(config, overrides, flags, resume, ckpt, from_scratch, force)
        cfg, stored = load_run_config(DetectConfig, "detect", config, overrides, flags, resume, RESUMABLE, cont)
        if preview == "config":
            return print_config(cfg)
        if preview == "plan":
            return dry_run(cfg, config, stored, force, Init(ckpt, from_scratch)).show()
        if stored is not None:
            _check_resume_init(stored, ckpt, from_scratch)
            return run(cfg, config, None, stored)
        if not ckpt and not from_scratch:
            raise LdaeError("detect needs --ckpt PRETRAIN (a pretrain checkpoint or an exported encoder), or "
                            "--from-scratch for the randomly initialised baseline")
        if ckpt and read_metadata(ckpt)["kind"] == "detect":
            raise LdaeError(f"{ckpt}: is a 'detect' checkpoint; evaluate it with --eval-only or continue its run "
                            "with --resume RUN_DIR; training starts from a 'pretrain' or 'encoder' checkpoint")
        return run(cfg, config, Init(ckpt, from_scratch), force=force)


def _eval_only(config: str | None, overrides: list[str], flags: dict, resume: str | None, ckpt: str | None,
               from_scratch: bool, force: bool) -> Path:
    if resume or from_scratch:
        raise LdaeError("--eval-only evaluates --ckpt (a trained detect checkpoint); it takes neither "
                        "--resume nor --from-scratch")
    if not ckpt:
        raise LdaeError(f"--eval-only needs --ckpt, a `detect` checkpoint (e.g. runs/detect/<name>/{CHECKPOINT})")
    trained = load_checkpoint(ckpt, "detect")
    # results go next to the checkpoint (wherever it is now) unless --out says otherwise
    base = {**trained.config, "run": {**trained.config["run"], "out_dir": None}}
    cfg = load_config(DetectConfig, config, overrides, flags, base=base)
    return evaluate_checkpoint(cfg, trained, force)


@dataclass
class Init:
    ckpt: str | None  # pretrain / encoder checkpoint (with from_scratch: only its architecture is used)
    from_scratch: bool


def _check_resume_init(stored: Checkpoint, ckpt: str | None, from_scratch: bool) -> None:
    """--ckpt / --from-scratch on a resume may repeat the original command, but not change it."""
    stored.require("init", "backbone.width", "backbone.depth", "backbone.num_heads", "backbone.patch_size",
                   "backbone.pretrain_image_size")
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


def run(cfg: DetectConfig, config_name: str | None, init_spec: Init | None,
        resume_ckpt: Checkpoint | None = None, force: bool = False) -> Path:
    if resume_ckpt is not None:
        spec = detection.BackboneSpec(**resume_ckpt.extra["backbone"])
        encoder_state, parents = None, resume_ckpt.provenance.get("parents", [])
        start_kind, report = resume_ckpt.extra["init"], resume_ckpt.extra.get("load_report")
    else:
        spec, encoder_state, parents = resolve_backbone(cfg, init_spec)
        start_kind, report = ("scratch" if encoder_state is None else "pretrain"), None
    train_split, eval_split = register_splits(cfg)
    with session("detect", "detect", cfg, config_name, resume_ckpt, force, config_file=config_name,
                 resumable=RESUMABLE) as s:
        cfg.optim.accumulation(s.ctx.world)  # a batch the ranks cannot split fails before the detector is built
        torch.manual_seed(cfg.run.seed)  # detector init: identical on every rank
        model = detection.build_detector(spec, settings(cfg, len(train_split.class_names)))
        if encoder_state is not None:
            loaded = detection.load_encoder_into(model, encoder_state, init_spec.ckpt)
            report = loaded.to_dict()
            if s.ctx.is_main:
                console.print(loaded.summary())
                s.output("load_report.json").write_text(json.dumps(report, indent=1) + "\n")
        model.to(s.ctx.device)
        description = {"backbone": spec.to_dict(), "num_classes": len(train_split.class_names),
                       "class_names": train_split.class_names, "image_size": cfg.data.image_size,
                       "init": start_kind, "load_report": report}
        engine_detect.train(s, model, spec.depth, train_split, eval_split, description, parents)
        return s.checkpoint


# ---------------------------------------------------------------------------------------------
# Evaluation only
# ---------------------------------------------------------------------------------------------

def evaluate_checkpoint(cfg: DetectConfig, trained: Checkpoint, force: bool = False) -> Path:
    """COCO AP of a trained detector on data.eval_split: eval-only-<split>.json (and pycocotools' tables) next to
    it, or in run.out_dir; files of that name are replaced only with --force."""
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else trained.path.parent
    result, text = out_dir / f"eval-only-{cfg.data.eval_split}.json", f"coco_eval-only-{cfg.data.eval_split}.txt"
    refuse_to_replace(result, force, "evaluation")
    trained.require("backbone.width", "backbone.depth", "backbone.num_heads", "backbone.patch_size",
                    "backbone.pretrain_image_size", "num_classes", "class_names", "step")
    if not cfg.data.path:
        raise LdaeError("data.path is not set; give --data COCO_ROOT")
    split = detection.register_coco_split(cfg.data.path, cfg.data.eval_split)
    if split.class_names != trained.extra["class_names"]:
        raise LdaeError(f"{split.json_file}: its {len(split.class_names)} categories differ from the "
                        f"{trained.extra['num_classes']} the detector {trained.path} was trained on")
    ctx = init(cfg.run.device)
    try:
        spec = detection.BackboneSpec(**trained.extra["backbone"])
        model = detection.build_detector(spec, settings(cfg, trained.extra["num_classes"]))
        load_state(model, trained.section("model"), str(trained.path))
        model.to(ctx.device)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        results = run_evaluation(model, split, cfg, out_dir, ctx, text=text)
        if ctx.is_main:
            console.print(ap_table(results, f"COCO {cfg.data.eval_split}: {trained.path}"))
            record = {"checkpoint": str(trained.path), "sha256": trained.sha256, "step": trained.extra["step"],
                      **results}
            result.write_text(json.dumps(record, indent=1) + "\n")
        return result
    finally:
        shutdown(ctx)
