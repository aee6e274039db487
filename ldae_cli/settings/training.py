"""The config sections a pretrain run reads (data, tokenizer, model, diffusion, online probe, run), the pretrain
config itself and those of fit-pca and train-tokenizer, kept free of torch: a config or `--set` error is reported
before torch loads (the command line checks a new run's config with these alone, in under a second). The code that
reads each section stays where it was (data/pipeline.py; model/: tokenizers, models, diffusion, pca, autoencoders;
train/: online_probe, session, engine_pretrain, engine_tokenizer), each importing its class from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional

from ldae_cli.config import require
from ldae_cli.errors import LdaeError
from ldae_cli.settings.contrastive import MocoV3Config
from ldae_cli.settings.optim import OptimConfig

DEFAULT_T = 10  # the timestep encoders are folded at


Source = Literal["auto", "fashion-mnist", "cifar10", "imagefolder", "images"]


@dataclass
class DataConfig:
    # auto: what data.path holds (a prepared dataset, IDX files, a class tree, a folder or archive of images; no
    # path: the default Fashion-MNIST), detected when a run starts and stored in its config as the kind found
    source: Source = "auto"
    path: Optional[str] = None  # None: the source's default location (see `default_locations`)
    train_split: str = "train"
    # None: 'test' for fashion-mnist/cifar10; for a class tree the first of val, validation, test it has
    eval_split: Optional[str] = None
    image_size: Optional[int] = None  # None: the data's native size (native_image_size), settled when a run starts
    crop: Literal["center", "random-resized"] = "center"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = False
    on_bad_image: Literal["error", "skip"] = "error"
    # where training images are decoded: PIL in DataLoader workers, or batched on the training device
    # (torchvision's decode_jpeg: nvjpeg on CUDA), center crop and antialiased bicubic resize there too
    decode: Literal["pil", "gpu"] = "pil"
    num_workers: int = 2
    cache: Literal["auto", "always", "never"] = "auto"  # decoded images kept in RAM when crops are fixed
    verify: bool = True  # a prepared dataset: check every file's sha256 when the split is opened
    limit: Optional[int] = None  # use a seeded random subset of this many images per split

    def validate(self) -> None:
        if self.image_size is not None and self.image_size < 2:
            raise LdaeError(f"data.image_size: must be at least 2, got {self.image_size}")
        require("data", ">= 0", lambda v: v >= 0, num_workers=self.num_workers)
        if len(self.crop_scale) != 2 or not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise LdaeError(f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if self.limit is not None and self.limit < 1:
            raise LdaeError(f"data.limit: must be a positive number of images or null, got {self.limit}")
        if self.decode == "gpu" and self.crop != "center":
            raise LdaeError(
                "data.decode=gpu decodes center crops (pretraining); random-resized crops are decoded by "
                "PIL: set data.decode=pil, or prepare the dataset with `ldae prepare-data --margin 1.15`"
            )

    @property
    def settled_size(self) -> int:
        """image_size once the run has settled it (data.pipeline.resolve_image_size), as every stage does first."""
        assert self.image_size is not None, "data.image_size read before the run settled it"
        return self.image_size

    def split_name(self, split: str) -> str:
        if split == "train":
            return self.train_split
        if self.eval_split is not None:
            return self.eval_split
        return "val" if self.source == "imagefolder" else "test"


LatentScale = Literal["global", "whiten", "none", "fixed"]
PCA_DIM = 16  # the d a PCA keeps unless told (fit-pca's, and a run's that fits its own; docs/studies/latent-dim)


@dataclass
class TokenizerConfig:
    """The `tokenizer:` section of a pretrain config."""

    kind: Literal["pca", "pixel", "trained"] = "pca"
    path: Optional[str] = None  # pca: a fit-pca checkpoint (null: fitted on the training data first); trained: required
    patch: int = 16  # pca/pixel: patch size in pixels (must match the checkpoint when one is given)
    dim: Optional[int] = None  # pca: kept components d (null: the checkpoint's, or PCA_DIM); pixel: must be null
    latent_scale: LatentScale = "global"
    # latent_scale 'fixed' (pca): divide by the global scale of the first scale_dim components whatever d is kept,
    # so the noise on the kept components does not change with d (with 'global' it grows as d shrinks)
    scale_dim: Optional[int] = None
    fit_patches: int = 1_000_000  # pca fitted on the fly: patches sampled

    def validate(self) -> None:
        require(
            "tokenizer",
            "a positive integer",
            lambda v: v > 0,
            patch=self.patch,
            dim=self.dim,
            fit_patches=self.fit_patches,
            scale_dim=self.scale_dim,
        )
        if self.latent_scale == "fixed" and (self.kind != "pca" or self.scale_dim is None):
            raise LdaeError(
                "tokenizer.latent_scale 'fixed' scales a PCA latent by the global scale of "
                f"tokenizer.scale_dim components: set kind pca and scale_dim (got kind {self.kind!r}, "
                f"scale_dim {self.scale_dim})"
            )
        if self.scale_dim is not None and self.latent_scale != "fixed":
            raise LdaeError(
                f"tokenizer.scale_dim is read only with latent_scale 'fixed' (got {self.latent_scale!r}); "
                "set scale_dim null or latent_scale fixed"
            )
        if self.kind == "pixel" and self.dim is not None:
            raise LdaeError("tokenizer.dim: the pixel tokenizer keeps every pixel (d = patch*patch*3); leave dim null")
        if self.kind == "pixel" and self.latent_scale != "none":
            raise LdaeError("tokenizer.latent_scale: the pixel tokenizer has no fitted statistics; use 'none'")
        if self.kind == "trained" and not self.path:
            raise LdaeError("tokenizer.path: a 'trained' tokenizer needs the checkpoint written by train-tokenizer")


class Size(NamedTuple):
    width: int
    encoder_depth: int
    decoder_depth: int
    num_heads: int


# The encoder of B / L is ViT-B / ViT-L; half-L is DiT-L (its 12 encoder blocks are ViT-1/2L).
SIZES = {
    "T": Size(192, 12, 12, 3),
    "S": Size(384, 12, 12, 6),
    "B": Size(768, 12, 12, 12),
    "half-L": Size(1024, 12, 12, 16),
    "L": Size(1024, 24, 24, 16),
}
SizeName = Literal["T", "S", "B", "half-L", "L", "custom"]


def check_shape(where: str, width: int, num_heads: int) -> None:
    """Heads must split the width, and the 2-D sin-cos position embedding needs a width divisible by 4."""
    if num_heads < 1 or width < 4:
        raise LdaeError(f"{where}: width must be >= 4 and num_heads >= 1, got width {width} and {num_heads} heads")
    if width % num_heads or width % 4:
        raise LdaeError(
            f"{where}.width {width} must be divisible by {where}.num_heads {num_heads} and by 4 (the "
            f"2-D sin-cos position embedding); e.g. width {max(num_heads, 4) * 16 // 4 * 4}"
        )


def resolve_size(where: str, size: str, **given: int | None) -> tuple[int, ...]:
    """The values named in `given` (width, encoder_depth or depth for the encoder, decoder_depth,
    num_heads), in that order: each the config's own when set, else the preset's. `where` is the config
    section (`model`, `model.arch`, `backbone`), named in the error when a 'custom' size lacks a value."""
    preset = SIZES.get(size)
    values: list[int] = []
    missing: list[str] = []
    for name, value in given.items():
        if value is None and preset is not None:
            value = getattr(preset, "encoder_depth" if name == "depth" else name)
        if value is None:
            missing.append(f"{where}.{name}")
        else:
            values.append(value)
    if missing:
        raise LdaeError(f"{where}.size '{size}' needs {', '.join(missing)}")
    return tuple(values)


@dataclass
class ModelConfig:
    size: SizeName = "half-L"
    width: Optional[int] = None  # these four override the size preset (all four needed for 'custom')
    encoder_depth: Optional[int] = None
    decoder_depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    adaln_hidden_ratio: float = 0.25  # the paper's "1/4 width" conditioning MLP
    class_conditional: bool = False
    class_dropout: float = 0.1  # labels replaced by the null label this often (classifier-free guidance style)

    def resolved(self) -> tuple[int, ...]:  # width, encoder_depth, decoder_depth, num_heads
        return resolve_size(
            "model",
            self.size,
            width=self.width,
            encoder_depth=self.encoder_depth,
            decoder_depth=self.decoder_depth,
            num_heads=self.num_heads,
        )

    def validate(self) -> None:
        width, enc, dec, heads = self.resolved()
        check_shape("model", width, heads)
        if enc < 1 or dec < 0:
            raise LdaeError(f"model: encoder_depth must be >= 1 and decoder_depth >= 0 (got {enc}, {dec})")
        require("model", "> 0", lambda v: v > 0, mlp_ratio=self.mlp_ratio, adaln_hidden_ratio=self.adaln_hidden_ratio)
        require("model", "in [0, 1)", lambda v: 0 <= v < 1, class_dropout=self.class_dropout)


Schedule = Literal["ddpm", "linear-gamma2", "linear-sigma", "constant"]
LossWeight = Literal["1", "gamma2", "snr", "inv1p"]


@dataclass
class DiffusionConfig:
    schedule: Schedule = "linear-sigma"
    timesteps: int = 1000
    constant_sigma: float = math.sqrt(1 / 3)
    constant_t: int = 10  # the t the model is conditioned on under the `constant` schedule
    target: Literal["eps", "z0", "x0"] = "x0"
    loss_weight: LossWeight = "inv1p"
    input_space: Literal["latent", "image"] = "image"
    output_space: Literal["latent", "image"] = "image"
    tail_weight: float = 0.1  # w_i for PCA components i > d under the x0 target (1.0 = plain pixel MSE)

    def validate(self) -> None:
        if self.timesteps < 1:
            raise LdaeError(f"diffusion.timesteps must be positive, got {self.timesteps}")
        if self.target == "eps" and self.output_space != "latent":
            raise LdaeError("diffusion.target 'eps' predicts latent noise: set diffusion.output_space to 'latent'")
        if self.target == "x0" and self.output_space != "image":
            raise LdaeError("diffusion.target 'x0' predicts the original image: set diffusion.output_space to 'image'")
        if not 0 <= self.tail_weight:
            raise LdaeError(f"diffusion.tail_weight must be >= 0, got {self.tail_weight}")
        if not 0 < self.constant_sigma < 1e6:
            raise LdaeError(f"diffusion.constant_sigma must be a positive noise level, got {self.constant_sigma}")
        if self.schedule == "constant" and not 0 <= self.constant_t <= self.timesteps:
            raise LdaeError(f"diffusion.constant_t must lie in 0..{self.timesteps}")


@dataclass
class OnlineProbeConfig:
    """k-NN and a quick linear probe of the encoder while it pretrains: fitted on a class-balanced seeded subset of
    the train split, tested on a seeded subset of the eval split."""

    enabled: bool = True  # runs whenever the dataset has labelled train and evaluation splits
    every: Optional[int] = None  # optimizer steps between probes; null = a quarter of the run (4 probes)
    fit_images: int = 20000  # the most train images it fits on (k-NN bank, linear heads), the same count per class
    per_class: int = 10  # its floor: the fewest fit images per class; below it the probe is off (the plan says why)
    test_images: int = 1000  # the seeded eval subset it tests on
    # of the run's compute all probes together may take, by a cost model (a training image 3 forwards of every
    # block, a probed one 1 of the encoder's) that a CPU measures a little low (5.3 probed images per training
    # image, not 6): 4 % keeps the measured share under 5 %; the fit subset shrinks to stay within it, and a
    # measured share above it makes the probe run less often
    max_share: float = 0.04
    t: int = DEFAULT_T
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_steps: int = 500  # LARS steps of the quick linear heads on cached features: a second or so on a CPU
    linear_batch: int = 256
    linear_blrs: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])  # the best head is reported
    batch: int = 256  # feature extraction

    def validate(self) -> None:
        require(
            "online_probe",
            "a positive integer",
            lambda v: v > 0,
            every=self.every,
            knn_k=self.knn_k,
            fit_images=self.fit_images,
            per_class=self.per_class,
            test_images=self.test_images,
            linear_steps=self.linear_steps,
            linear_batch=self.linear_batch,
            batch=self.batch,
        )
        require("online_probe", ">= 0", lambda v: v >= 0, t=self.t)
        require("online_probe", "> 0", lambda v: v > 0, knn_temperature=self.knn_temperature)
        require("online_probe", "in (0, 1]", lambda v: 0 < v <= 1, max_share=self.max_share)
        if not self.linear_blrs or any(b <= 0 for b in self.linear_blrs):
            raise LdaeError(f"online_probe.linear_blrs: give positive base learning rates, got {self.linear_blrs}")
        for key in ("knn_k", "linear_batch"):  # both are cut to the fit subset, which holds at most fit_images
            if getattr(self, key) > self.fit_images:
                raise LdaeError(
                    f"online_probe.{key} {getattr(self, key)} is more than online_probe.fit_images "
                    f"{self.fit_images}, the most images the probe fits on; lower it to {self.fit_images} "
                    "or less, or raise fit_images"
                )


@dataclass
class MAEConfig:
    """The `mae:` section, read when `objective: mae` (He et al. 2022; facebookresearch/mae's models_mae.py)."""

    mask_ratio: float = 0.75  # of each image's patches, hidden from the encoder and reconstructed
    norm_pix_loss: bool = True  # the target is each patch normalised by its own mean and variance
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    def validate(self) -> None:
        require("mae", "in (0, 1)", lambda v: 0 < v < 1, mask_ratio=self.mask_ratio)
        require("mae", ">= 1", lambda v: v >= 1, decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads)
        if self.decoder_width % self.decoder_heads or self.decoder_width % 4:
            raise LdaeError(
                f"mae.decoder_width {self.decoder_width} must be divisible by mae.decoder_heads "
                f"{self.decoder_heads} and by 4 (the 2-D sin-cos position embedding), e.g. 512"
            )


Objective = Literal["ldae", "mae", "mocov3"]
MAX_SEED = 2**31 - 1  # seeds are mixed into generator seeds that must stay within 64 bits


@dataclass
class RunConfig:
    out_dir: Optional[str] = None  # default: runs/<stage>/<config name>
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    log_every: int = 20  # steps between metrics.jsonl lines (and the NaN check)
    save_every: int = 500  # steps between checkpoints (one is always written at the end)
    time_limit_minutes: Optional[float] = None  # stop cleanly (checkpoint written) after this long; resume later
    stop_after_steps: Optional[int] = None  # stop cleanly after this many steps of this invocation
    progress: bool = True  # a progress bar on a terminal, plain log lines when output goes to a file
    tensorboard: bool = True  # event files in <run>/tensorboard: every logged scalar, pictures at each save
    wandb: bool = False  # also log to Weights & Biases (offline unless WANDB_MODE=online)

    def validate(self) -> None:
        if self.log_every < 1 or self.save_every < 1:
            raise LdaeError(
                f"run.log_every and run.save_every are numbers of steps (1 or more), got "
                f"{self.log_every} and {self.save_every}"
            )
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise LdaeError(f"run.stop_after_steps must be 1 or more (or null), got {self.stop_after_steps}")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise LdaeError(f"run.time_limit_minutes must be positive (or null), got {self.time_limit_minutes}")
        if not 0 <= self.seed <= MAX_SEED:
            raise LdaeError(f"run.seed must lie in 0 ... {MAX_SEED} (2**31 - 1), got {self.seed}")


@dataclass
class PretrainConfig:
    # what the encoder learns from (model/objectives.py): ldae denoises (tokenizer, model, diffusion); mae masks (the
    # `mae:` section), mocov3 contrasts two views (the `mocov3:` section): both on the pixel tokenizer, the model's
    # encoder blocks only, no timestep (t = DEFAULT_T)
    objective: Objective = "ldae"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    mocov3: MocoV3Config = field(default_factory=MocoV3Config)

    def validate(self) -> None:
        if self.objective != "ldae":
            self.validate_baseline()
        if self.model.class_conditional and self.data.source == "images":
            raise LdaeError("model.class_conditional needs labelled data; data.source 'images' has no labels")
        tc, full = self.tokenizer, self.tokenizer.patch**2 * 3
        size = self.data.image_size  # null: settled to a multiple
        if tc.kind != "trained" and size is not None and size % tc.patch:
            raise LdaeError(
                f"data.image_size {self.data.image_size} is not a multiple of tokenizer.patch {tc.patch}; "
                f"use e.g. data.image_size={size // tc.patch * tc.patch or tc.patch}"
            )
        if tc.kind == "pca" and tc.dim is not None and tc.dim > full:
            raise LdaeError(
                f"tokenizer.dim {tc.dim} is more than the {full} values of a {tc.patch}x{tc.patch}x3 patch; "
                f"PCA keeps between 1 and {full} components"
            )
        if tc.kind == "pca" and not tc.path and tc.fit_patches <= full:
            raise LdaeError(
                f"tokenizer.fit_patches: fitting a PCA of {full}-dim patches needs more than {full} "
                f"patches, got {tc.fit_patches}"
            )

    def validate_baseline(self) -> None:
        """MAE and MoCo v3 train the encoder blocks on raw patches at one timestep, with their own section's heads;
        MoCo's views are its augmentation (the loader's images stay whole)."""
        needs: list[tuple[str, object, object]] = [
            ("tokenizer.kind", self.tokenizer.kind, "pixel"),
            ("tokenizer.latent_scale", self.tokenizer.latent_scale, "none"),
            ("model.decoder_depth", self.model.resolved()[2], 0),
            ("model.class_conditional", self.model.class_conditional, False),
            ("online_probe.t", self.online_probe.t, DEFAULT_T),
        ]
        if self.objective == "mocov3":
            needs += [("data.crop", self.data.crop, "center"), ("data.hflip", self.data.hflip, False)]
        wrong = [f"{key} {value!r} (needs {need!r})" for key, value, need in needs if value != need]
        if wrong:
            raise LdaeError(
                f"objective {self.objective}: {'; '.join(wrong)}: it reads raw pixel patches, trains with "
                f"the {self.objective}: section's heads and has no timestep (its encoder is folded at "
                f"t = {DEFAULT_T})"
                + ("; its two views are the augmentation, made from whole images" if self.objective == "mocov3" else "")
            )
        if self.objective == "mocov3" and self.optim.micro_batch is not None:
            raise LdaeError(
                f"optim.micro_batch {self.optim.micro_batch}: MoCo v3 takes no gradient accumulation (its "
                "InfoNCE negatives and head BatchNorms span the global batch, each rank's share in one "
                "pass); set optim.micro_batch=null"
            )
        if self.objective == "mocov3" and self.run.compile:
            raise LdaeError(
                "run.compile: MoCo v3's per-image views and its collectives (the keys' all_gather, the "
                "head BatchNorms' all_reduce) run outside torch.compile; set run.compile=false"
            )


def block_forwards(objective: str, model: ModelConfig) -> int:
    """Forwards of a block one training image of `objective` costs, the online probe's cost model: a forward and a
    backward (3 forwards) of every block; MoCo v3: of the encoder on two views, and the momentum encoder's forward on
    both."""
    _, enc, dec, _ = model.resolved()
    return 8 * enc if objective == "mocov3" else 3 * (enc + dec)


# fit-pca's config (pca.py reads it)


@dataclass
class PCAConfig:
    patch: int = 16
    dim: int = PCA_DIM
    patches: int = 1_000_000
    patches_per_image: int = 16
    batch_images: int = 256
    seed: int = 0
    # 'grid': patches where the tokenizer cuts them (JPEG's 8x8 blocks align with that grid, so
    # statistics at other offsets differ measurably); 'any': every pixel offset
    positions: Literal["grid", "any"] = "grid"

    def validate(self) -> None:
        full = self.patch * self.patch * 3
        if self.patch < 1:
            raise LdaeError(f"pca.patch: must be positive, got {self.patch}")
        if not 1 <= self.dim <= full:
            raise LdaeError(f"pca.dim: must be between 1 and patch*patch*3 = {full}, got {self.dim}")
        if self.patches < full + 1:
            raise LdaeError(f"pca.patches: need more patches than dimensions ({full}), got {self.patches}")
        if self.patches_per_image < 1 or self.batch_images < 1:
            raise LdaeError("pca.patches_per_image and pca.batch_images must be positive")


@dataclass
class FitPCAConfig:
    data: DataConfig = field(default_factory=DataConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    out: Optional[str] = None  # default: runs/pca/<data folder>-p<patch>-d<dim>-<size>px.safetensors (default_out)


# train-tokenizer's config (engine_tokenizer.py and autoencoders.py read it)


@dataclass
class AutoencoderConfig:
    """The `tokenizer:` section of a train-tokenizer config (the architecture)."""

    kind: Literal["conv-vae", "patch-vae", "patch-ae"] = "conv-vae"
    # patch-vae / patch-ae: token = one p x p patch, d latent values per token
    patch: int = 16
    dim: int = 16
    # conv-vae: latent map of `latent_channels` at 1/stride resolution; token = token_group^2 positions
    stride: int = 8
    latent_channels: int = 4
    token_group: int = 2
    channels: int = 128  # width of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # one entry per level: log2(stride)+1
    res_blocks: int = 2
    attention: bool = True  # self-attention in the mid block (LDM); costly at large latent maps

    def validate(self) -> None:
        if self.kind == "conv-vae":
            if self.stride < 1 or self.stride & (self.stride - 1):
                raise LdaeError(f"tokenizer.stride: must be a power of two (1, 2, 4, 8, ...), got {self.stride}")
            levels = int(math.log2(self.stride)) + 1
            if len(self.channel_mult) != levels:
                raise LdaeError(
                    f"tokenizer.channel_mult has {len(self.channel_mult)} levels but stride "
                    f"{self.stride} needs {levels} (one per resolution), e.g. "
                    f"{[min(2**i, 4) for i in range(levels)]}"
                )
            if min(self.latent_channels, self.token_group, self.channels, self.res_blocks, *self.channel_mult) < 1:
                raise LdaeError(
                    "tokenizer.latent_channels, token_group, channels, res_blocks and channel_mult must be positive"
                )
        else:
            if self.patch < 1 or not 1 <= self.dim <= self.patch * self.patch * 3:
                raise LdaeError(
                    f"tokenizer.dim: a {self.patch}x{self.patch}x3 patch tokenizer keeps between 1 "
                    f"and {self.patch * self.patch * 3} dims, got {self.dim}"
                )

    def spec(self) -> dict:
        """The JSON-able description stored in checkpoints, enough to rebuild the network."""
        if self.kind == "conv-vae":
            return {
                "kind": self.kind,
                "stride": self.stride,
                "latent_channels": self.latent_channels,
                "token_group": self.token_group,
                "channels": self.channels,
                "channel_mult": list(self.channel_mult),
                "res_blocks": self.res_blocks,
                "attention": self.attention,
            }
        return {"kind": self.kind, "patch": self.patch, "dim": self.dim}


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
            raise LdaeError(
                f"loss.perceptual_weight is {self.perceptual_weight:g} but loss.vgg_weights is empty: "
                f"the perceptual loss needs VGG16 weights (a torchvision VGG16 state dict saved as "
                f".safetensors; none is downloaded); set loss.vgg_weights=PATH or loss.perceptual_weight=0"
            )
        if self.disc_start < 0 or self.disc_layers < 1 or self.disc_channels < 1:
            raise LdaeError("loss.disc_start must be >= 0, loss.disc_layers and loss.disc_channels positive")


@dataclass
class ReportConfig:
    images: int = 1000  # held-out images (eval split) for the reconstruction PSNR
    stats_images: int = 10000  # training images for the latent mean / std stored for latent_scale
    pca_reference: bool = True  # also fit a patch PCA of the same footprint and d, and report its PSNR
    pca_patches: int = 200_000  # patches for that PCA
    grid_images: int = 8  # rows of reconstructions.png

    def validate(self) -> None:
        if min(self.images, self.stats_images, self.grid_images) < 1:
            raise LdaeError("report.images, report.stats_images and report.grid_images must be positive")


@dataclass
class TrainTokenizerConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    run: RunConfig = field(default_factory=RunConfig)
