"""`ldae pretrain`: build tokenizer, model and objective from a config, then run the training engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldae_cli.checkpoint import load_checkpoint
from ldae_cli.config import load_config, save_resolved, to_dict
from ldae_cli.data import DataConfig, build_dataset
from ldae_cli.diffusion import Denoiser, DiffusionConfig, NoiseSchedule
from ldae_cli.distributed import DistContext, barrier, init, shutdown
from ldae_cli.engine import OptimConfig, RunConfig, check_resume_config, open_run_dir, resume_base
from ldae_cli.engine_pretrain import PretrainJob, train
from ldae_cli.errors import LdaeError
from ldae_cli.models import ModelConfig, build_model
from ldae_cli.reporting import console
from ldae_cli.stages import fit_pca
from ldae_cli.tokenizers import PixelTokenizer, Tokenizer, TokenizerConfig, pca_from_checkpoint

# keys a resumed run may change: where things are and how they are run, not what is computed
RESUMABLE_CHANGES = ("data.path", "data.num_workers", "data.cache", "data.on_bad_image", "run.device",
                     "run.compile", "run.log_every", "run.save_every", "run.time_limit_minutes",
                     "run.stop_after_steps", "run.progress", "run.out_dir", "optim.micro_batch")
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.model.class_conditional and self.data.source == "images":
            raise LdaeError("model.class_conditional needs labelled data; data.source 'images' has no labels")


def build_tokenizer(cfg: PretrainConfig, out_dir: Path, ctx: DistContext) -> tuple[Tokenizer, list[dict]]:
    tc = cfg.tokenizer
    if tc.kind == "pixel":
        return PixelTokenizer(tc.patch), []
    if tc.kind == "trained":
        from ldae_cli.trained_tokenizers import load_trained_tokenizer
        ckpt = load_checkpoint(tc.path, "tokenizer")
        return load_trained_tokenizer(ckpt, tc.latent_scale, tc.patch, tc.dim), [ckpt.parent_ref("tokenizer")]
    path = Path(tc.path) if tc.path else out_dir / "pca.safetensors"
    if not tc.path and not path.exists():
        if ctx.is_main:
            settings = fit_pca.PCASettings(patch=tc.patch, dim=tc.dim or 16, patches=tc.fit_patches,
                                           seed=cfg.run.seed)
            fit_cfg = fit_pca.FitPCAConfig(data=cfg.data, pca=settings, out=str(path))
            dataset = build_dataset(cfg.data, "train", augment=False, seed=cfg.run.seed)
            console.print(f"tokenizer.path is empty: fitting the PCA tokenizer on the training data -> {path}")
            result = fit_pca.fit(dataset, settings, cfg.data.on_bad_image, cfg.data.num_workers, cfg.run.progress)
            fit_pca.save(result, fit_cfg, path)
        barrier(ctx)
    ckpt = load_checkpoint(path, "pca")
    return pca_from_checkpoint(ckpt, tc.dim, tc.latent_scale, tc.patch), [ckpt.parent_ref("tokenizer")]


def _payload(tokenizer: Tokenizer, cfg: PretrainConfig, num_classes: int, class_names: list[str]):
    tok_tensors, tok_desc = tokenizer.export()

    def payload(model, ema):
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
        tensors.update({f"tokenizer.{k}": v for k, v in tok_tensors.items()})
        extra = {"model_spec": model.spec, "tokenizer": tok_desc, "image_size": cfg.data.image_size,
                 "num_classes": num_classes, "class_names": class_names, "has_ema": ema is not None}
        return tensors, extra
    return payload


def resolve_resume(resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise LdaeError(f"--resume {resume}: no checkpoint there (expected a run directory holding {CHECKPOINT})")
    return path


def load_pretrain_config(config: str | None, overrides: list[str], flags: dict, resume: str | None
                         ) -> tuple[PretrainConfig, object]:
    """The config to run and, when resuming, the checkpoint (whose stored recipe must not change)."""
    if resume is None:
        return load_config(PretrainConfig, config, overrides, flags), None
    ckpt = load_checkpoint(resolve_resume(resume), "pretrain")
    cfg = load_config(PretrainConfig, config, overrides, flags, base=resume_base(ckpt.config))
    check_resume_config(ckpt.config, to_dict(cfg), RESUMABLE_CHANGES)
    return cfg, ckpt


def run(cfg: PretrainConfig, config_name: str | None = None, resume_ckpt=None) -> Path:
    ctx = init(cfg.run.device)
    try:
        out_dir = open_run_dir("pretrain", "pretrain", cfg.run.out_dir, config_name, resume_ckpt, CHECKPOINT)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, out_dir / "config.yaml")
        torch.manual_seed(cfg.run.seed)  # model init: identical on every rank
        tokenizer, parents = build_tokenizer(cfg, out_dir, ctx)
        dataset = build_dataset(cfg.data, "train", seed=cfg.run.seed)
        num_classes = dataset.num_classes
        if cfg.model.class_conditional and num_classes == 0:
            raise LdaeError("model.class_conditional needs labelled data, but the dataset has no classes")
        schedule = NoiseSchedule(cfg.diffusion)
        denoiser = Denoiser(cfg.diffusion, tokenizer, schedule, cfg.data.image_size)
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid, num_classes)
        if ctx.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            width, enc, dec, heads = cfg.model.resolved()
            console.print(f"model: {enc}+{dec} blocks, width {width}, {heads} heads, {n_params / 1e6:.1f}M params; "
                          f"tokenizer {tokenizer.kind} p={tokenizer.patch} d={tokenizer.token_dim}; "
                          f"{cfg.diffusion.schedule} schedule, target {cfg.diffusion.target}, "
                          f"{cfg.diffusion.input_space}->{cfg.diffusion.output_space}")
        job = PretrainJob(
            denoiser=denoiser, model=model, dataset=dataset, optim=cfg.optim, run=cfg.run, out_dir=out_dir,
            checkpoint_payload=_payload(tokenizer, cfg, num_classes, dataset.classes), config=to_dict(cfg),
            parents=parents, class_dropout=cfg.model.class_dropout if cfg.model.class_conditional else 0.0,
            num_workers=cfg.data.num_workers, on_bad_image=cfg.data.on_bad_image, resume_from=resume_ckpt)
        return train(job, ctx)
    finally:
        shutdown(ctx)
