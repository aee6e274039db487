"""The configs of the evaluation stages (probe, finetune, detect) and their sections, kept free of torch like
training.py: a config or `--set` error is reported before torch loads. The code that reads them stays in
train/engine_probe.py, engine_finetune.py and engine_detect.py, each importing its classes from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ldae_cli.config import require
from ldae_cli.errors import LdaeError
from ldae_cli.settings.optim import OptimConfig, accumulation, check_warmup
from ldae_cli.settings.training import DEFAULT_T, DataConfig, RunConfig, SizeName, check_shape, resolve_size


@dataclass
class LinearProbeConfig:
    t: int = DEFAULT_T
    depth: Optional[int] = None  # blocks of the encoder; null = the encoder/decoder split
    noisy_input: bool = False  # add the level-t latent noise to the input (the paper's default is clean)
    features: Literal["encoder", "pixels"] = "encoder"  # pixels: the raw-image baseline
    ema: Optional[bool] = None  # the pretrain EMA weights; null = when the run kept them
    fast: bool = False
    blrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])  # one head each
    batch_size: int = 16384
    epochs: float = 90.0
    warmup_epochs: Optional[float] = None  # null = MAE's share of the run, 10 of 90 epochs (probe.epochs / 9)
    momentum: float = 0.9
    weight_decay: float = 0.0
    knn_k: int = 20
    knn_temperature: float = 0.07
    extract_batch: int = 256  # images per encoder forward
    # how the reported head (its lr) is chosen: on a seeded 10 % of the train split the heads never see (holdout),
    # or on the eval split whose top-1 it reports (eval: optimistic, the best-on-eval number papers give)
    select: Literal["holdout", "eval"] = "holdout"

    def validate(self) -> None:
        if not self.blrs or any(b <= 0 for b in self.blrs):
            raise LdaeError(f"probe.blrs: give one or more positive base learning rates, got {self.blrs}")
        if self.batch_size < 1 or self.epochs <= 0 or self.extract_batch < 1:
            raise LdaeError("probe.batch_size, probe.epochs and probe.extract_batch must be positive")
        require("probe", "a positive integer", lambda v: v > 0, depth=self.depth, knn_k=self.knn_k)
        require(
            "probe",
            ">= 0",
            lambda v: v >= 0,
            t=self.t,
            warmup_epochs=self.warmup_epochs,
            weight_decay=self.weight_decay,
        )
        require("probe", "> 0", lambda v: v > 0, knn_temperature=self.knn_temperature)
        require("probe", "in [0, 1)", lambda v: 0 <= v < 1, momentum=self.momentum)
        check_warmup("probe.warmup_epochs", self.warmup, "probe.epochs", self.epochs)

    @property
    def warmup(self) -> float:
        return self.epochs / 9 if self.warmup_epochs is None else self.warmup_epochs


@dataclass
class ProbeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(save_every=1000, log_every=50))


@dataclass
class ArchConfig:
    """The ViT that --from-scratch builds when no --ckpt is given (ignored when there is one)."""

    size: SizeName = "B"  # the encoder of one of the pretrain sizes (models.SIZES)
    width: Optional[int] = None  # these three override the size preset (all three needed for 'custom')
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch: int = 16
    mlp_ratio: float = 4.0

    def resolved(self) -> tuple[int, ...]:  # width, depth, num_heads
        return resolve_size("model.arch", self.size, width=self.width, depth=self.depth, num_heads=self.num_heads)

    def validate(self) -> None:
        width, depth, heads = self.resolved()
        check_shape("model.arch", width, heads)
        require("model.arch", "a positive integer", lambda v: v > 0, depth=depth, patch=self.patch)
        require("model.arch", "> 0", lambda v: v > 0, mlp_ratio=self.mlp_ratio)


@dataclass
class FinetuneModelConfig:
    ckpt: Optional[str] = None  # --ckpt: a pretrain checkpoint or an encoder from `ldae export`
    from_scratch: bool = False  # --from-scratch: the same network, randomly initialised
    t: int = DEFAULT_T  # timestep the pretrained adaLN encoder is folded at
    depth: Optional[int] = None  # blocks taken from the pretrained model; null = its encoder depth
    pretrain_ema: Optional[bool] = None  # which pretrain weights: null = the EMA when that run kept one
    drop_path: float = 0.1
    head_init_std: float = 2e-5  # MAE: trunc-normal head weights, zero bias
    arch: ArchConfig = field(default_factory=ArchConfig)

    def validate(self) -> None:
        if not 0 <= self.drop_path < 1:
            raise LdaeError(f"model.drop_path is a rate in [0, 1), got {self.drop_path}")
        if self.head_init_std <= 0:
            raise LdaeError(f"model.head_init_std must be positive, got {self.head_init_std}")
        require("model", ">= 0", lambda v: v >= 0, t=self.t)
        require("model", "a positive integer", lambda v: v > 0, depth=self.depth)


@dataclass
class AugConfig:
    rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; null = off
    mixup: float = 0.8  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 1.0  # Beta(alpha, alpha) of CutMix; 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # CutMix instead of mixup, when both are on
    mix_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1
    erase_prob: float = 0.25  # random erasing; 0 = off
    erase_mode: Literal["pixel", "rand", "const"] = "pixel"
    erase_count: int = 1

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    def validate(self) -> None:
        for name in ("mix_prob", "switch_prob", "erase_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise LdaeError(f"aug.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0 or not 0 <= self.label_smoothing < 1 or self.erase_count < 1:
            raise LdaeError("aug: mixup and cutmix must be >= 0, label_smoothing in [0, 1), erase_count >= 1")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The MAE fine-tuning defaults (ViT-B): AdamW, wd 0.05, 5 warm-up epochs of 100, EMA 0.9999."""

    batch_size: int = 1024
    blr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    epochs: float = 100.0
    warmup_epochs: float = 5.0
    ema: Optional[float] = 0.9999
    layer_decay: float = 0.75  # block i of N gets lr x layer_decay^(N - i); 1 = no decay

    def validate(self) -> None:
        super().validate()
        if not 0 < self.layer_decay <= 1:
            raise LdaeError(f"optim.layer_decay must lie in (0, 1], got {self.layer_decay}")


def _finetune_data() -> DataConfig:
    return DataConfig(crop="random-resized", crop_scale=[0.08, 1.0], hflip=True)


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=_finetune_data)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.data.source == "images":
            raise LdaeError(
                "finetune needs labelled data; data.source 'images' has no labels "
                "(use cifar10, fashion-mnist or imagefolder)"
            )
        even_micro_batch(self.aug, self.optim.micro_batch or self.optim.batch_size)


def even_micro_batch(aug: AugConfig, micro: int) -> None:
    """Mixup and CutMix pair the samples of a micro-batch (timm's Mixup), so it must hold an even number."""
    if aug.mixing and micro % 2:
        raise LdaeError(
            f"aug.mixup {aug.mixup:g} / aug.cutmix {aug.cutmix:g} pair the samples of a micro-batch, which "
            f"must be even, but it holds {micro} (optim.micro_batch, else optim.batch_size per rank); make "
            "it even or set aug.mixup=0 aug.cutmix=0"
        )


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

    def shape(self) -> tuple[int, ...] | None:
        """(width, depth, heads) this recipe is for, or None when it follows the checkpoint."""
        if self.size is None:
            return None
        return resolve_size("backbone", self.size, width=self.width, depth=self.depth, num_heads=self.num_heads)

    def validate(self) -> None:
        shape = self.shape()
        if shape:
            check_shape("backbone", shape[0], shape[2])
            require("backbone", "a positive integer", lambda v: v > 0, depth=shape[1])
        require(
            "backbone",
            "a positive integer",
            lambda v: v > 0,
            patch_size=self.patch_size,
            pretrain_image_size=self.pretrain_image_size,
        )
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
        require(
            "model",
            "a positive integer",
            lambda v: v > 0,
            pyramid_channels=self.pyramid_channels,
            box_fc_dim=self.box_fc_dim,
            roi_batch_per_image=self.roi_batch_per_image,
        )


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
            raise LdaeError(
                f"optim.lr_steps {self.lr_steps} of {self.iterations} iterations put lr steps at "
                f"{milestones}; use more optim.iterations or fewer lr_steps"
            )
        if self.warmup_iterations >= self.iterations:
            raise LdaeError(
                f"optim.warmup_iterations {self.warmup_iterations} is not fewer than optim.iterations "
                f"{self.iterations}: the lr would never reach its peak; set it below {self.iterations}"
            )
        if milestones and milestones[0] < self.warmup_iterations:
            raise LdaeError(
                f"optim.lr_steps {self.lr_steps} puts the first lr step at iteration {milestones[0]}, "
                f"inside the optim.warmup_iterations {self.warmup_iterations}; raise the first step or "
                "shorten the warm-up"
            )
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise LdaeError(
                f"optim.micro_batch {self.micro_batch} does not divide optim.batch_size {self.batch_size}; "
                "use a divisor of it, or null"
            )

    def milestones(self) -> list[int]:
        return [round(f * self.iterations) for f in self.lr_steps]

    def accumulation(self, world: int) -> tuple[int, int]:
        return accumulation(self.batch_size, self.micro_batch, world)

    def lr_schedule(self):
        """ViTDet's schedule as a function of progress in [0, 1): linear warm-up, then x0.1 at each step."""
        from detectron2.solver import WarmupParamScheduler  # detectron2 is imported only where it is used
        from fvcore.common.param_scheduler import MultiStepParamScheduler

        milestones = self.milestones()
        steps = MultiStepParamScheduler(
            values=[0.1**i for i in range(len(milestones) + 1)], milestones=milestones, num_updates=self.iterations
        )
        return WarmupParamScheduler(
            steps, warmup_factor=self.warmup_factor, warmup_length=min(1.0, self.warmup_iterations / self.iterations)
        )


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
            raise LdaeError(
                "run.compile: detect does not compile (Mask R-CNN has data-dependent shapes); set run.compile=false"
            )
        if self.eval.every is not None and self.eval.every > self.optim.iterations:
            raise LdaeError(
                f"eval.every {self.eval.every} is more than optim.iterations {self.optim.iterations}: no "
                "evaluation would fall inside the run (the end always evaluates); lower it, or null"
            )
