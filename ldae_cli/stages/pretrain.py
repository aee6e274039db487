"""`ldae pretrain`: build tokenizer, model and objective from a config, then run the training engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import torch

from ldae_cli import engine_pretrain, pca
from ldae_cli.data import DataConfig, build_dataset, to_unit_range
from ldae_cli.sources import open_source
from ldae_cli.plots import grid_tensor
from ldae_cli.diffusion import Denoiser, DiffusionConfig, NoiseSchedule
from ldae_cli.distributed import barrier
from ldae_cli.errors import LdaeError
from ldae_cli.models import ModelConfig, build_model
from ldae_cli.optim import OptimConfig
from ldae_cli.reporting import console
from ldae_cli.engine_probe import OnlineProbe, OnlineProbeConfig, online_subsets
from ldae_cli.pretrained import Pretrained
from ldae_cli.runs import RunConfig, Session, amp_dtype, load_run_config, session
from ldae_cli.checkpoint import Checkpoint
from ldae_cli.tokenizers import Tokenizer, TokenizerConfig, build_tokenizer, load_tokenizer


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)

    def validate(self) -> None:
        if self.model.class_conditional and self.data.source == "images":
            raise LdaeError("model.class_conditional needs labelled data; data.source 'images' has no labels")
        tc, full = self.tokenizer, self.tokenizer.patch ** 2 * 3
        if tc.kind != "trained" and self.data.image_size % tc.patch:
            raise LdaeError(f"data.image_size {self.data.image_size} is not a multiple of tokenizer.patch {tc.patch}; "
                            f"use e.g. data.image_size={self.data.image_size // tc.patch * tc.patch or tc.patch}")
        if tc.kind == "pca" and tc.dim is not None and tc.dim > full:
            raise LdaeError(f"tokenizer.dim {tc.dim} is more than the {full} values of a {tc.patch}x{tc.patch}x3 patch; "
                            f"PCA keeps between 1 and {full} components")
        if tc.kind == "pca" and not tc.path and tc.fit_patches <= full:
            raise LdaeError(f"tokenizer.fit_patches: fitting a PCA of {full}-dim patches needs more than {full} "
                            f"patches, got {tc.fit_patches}")


def configured_tokenizer(cfg: PretrainConfig, s: Session) -> tuple[Tokenizer, list[dict]]:
    """The configured tokenizer; a PCA without tokenizer.path is fitted on the training data first."""
    tc = cfg.tokenizer
    path = tc.path
    if tc.kind == "pca" and not path:
        path = s.output("pca.safetensors")
        if s.ctx.is_main and not path.exists():
            settings = pca.PCASettings(patch=tc.patch, dim=tc.dim or 16, patches=tc.fit_patches, seed=cfg.run.seed)
            dataset = build_dataset(cfg.data, "train", augment=False, seed=cfg.run.seed)
            console.print(f"tokenizer.path is empty: fitting the PCA tokenizer on the training data -> {path}")
            fitted = pca.fit(dataset, settings, cfg.data.on_bad_image, cfg.data.num_workers, cfg.run.progress)
            pca.save_fit(fitted, path, settings, {"data": s.config["data"], "pca": vars(settings), "out": str(path)},
                         cfg.data.image_size, cfg.data.source)
        barrier(s.ctx)
    return load_tokenizer(tc, path)


RESUMABLE = ("optim.micro_batch", "online_probe.")


def run(cfg: PretrainConfig, config_name: str | None = None, resume: Checkpoint | None = None,
        force: bool = False) -> Path:
    with session("pretrain", "pretrain", cfg, config_name, resume, force, config_file=config_name,
                 resumable=RESUMABLE) as s:
        cfg.optim.accumulation(s.ctx.world)  # a batch the ranks cannot split fails now, not after a PCA fit
        if cfg.data.eval_split is not None:  # an evaluation split named explicitly must be there, from the start
            open_source(cfg.data, "eval")
        torch.manual_seed(cfg.run.seed)  # model init: identical on every rank
        if resume is None:
            tokenizer, parents = configured_tokenizer(cfg, s)
        else:  # the tokenizer the run trained with, from its own checkpoint: never refitted or swapped
            resume.require("tokenizer.kind")
            tokenizer = build_tokenizer(resume.extra["tokenizer"], resume.section("tokenizer"), resume.path)
            parents = resume.provenance.get("parents", [])
        dataset = build_dataset(cfg.data, "train", seed=cfg.run.seed, training_stream=True)
        num_classes = dataset.num_classes
        if cfg.model.class_conditional and num_classes == 0:
            raise LdaeError("model.class_conditional needs labelled data, but the dataset has no classes")
        denoiser = Denoiser(cfg.diffusion, tokenizer, NoiseSchedule(cfg.diffusion), cfg.data.image_size)
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid, num_classes)
        if s.ctx.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            width, enc, dec, heads = cfg.model.resolved()
            console.print(f"model: {enc}+{dec} blocks, width {width}, {heads} heads, {n_params / 1e6:.1f}M params; "
                          f"tokenizer {tokenizer.kind} p={tokenizer.patch} d={tokenizer.token_dim}; "
                          f"{cfg.diffusion.schedule} schedule, target {cfg.diffusion.target}, "
                          f"{cfg.diffusion.input_space}->{cfg.diffusion.output_space}")
        tok_tensors, tok_desc = tokenizer.export()
        description = {"model_spec": model.spec, "tokenizer": tok_desc, "image_size": cfg.data.image_size,
                       "num_classes": num_classes, "class_names": dataset.classes, "has_ema": cfg.optim.ema is not None}

        def describe() -> tuple[dict, dict]:
            return {f"tokenizer.{k}": v for k, v in tok_tensors.items()}, dict(description)

        class_dropout = cfg.model.class_dropout if cfg.model.class_conditional else 0.0
        online = online_probe(cfg, model, tokenizer, denoiser, s)
        engine_pretrain.train(s, denoiser, model, dataset, class_dropout, describe, parents, online,
                              denoising_panel(online) if online is not None else None)
        return s.checkpoint


def denoising_panel(online: OnlineProbe, images: int = 8) -> Callable[[object], dict[str, torch.Tensor]]:
    """clean | noisy | denoised of the first test-subset images, for the dashboard at each save."""
    def draw(trainer) -> dict[str, torch.Tensor]:
        pre = online.view(trainer)
        items = [online.test[i][0] for i in range(min(images, len(online.test)))]
        clean = to_unit_range(torch.stack(items)).to(trainer.device)
        with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
            noisy, denoised = pre.denoise(clean, pre.timestep(), seed=0)
        rows = [[x[i].cpu() for x in (clean, noisy, denoised)] for i in range(len(items))]
        return {"denoising (clean | noisy | denoised)": grid_tensor(rows, max(1, 64 // clean.shape[-1]))}
    return draw


def online_probe(cfg: PretrainConfig, model, tokenizer: Tokenizer, denoiser: Denoiser, s: Session
                 ) -> OnlineProbe | None:
    """The online probe, when the dataset has labelled train and evaluation splits."""
    if not cfg.online_probe.enabled:
        return None
    try:
        fit, test = online_subsets(cfg, s.ctx)
    except LdaeError as exc:
        if s.ctx.is_main:
            console.print(f"online probe off: no usable labelled train and evaluation splits ({exc}); set "
                          "online_probe.enabled=false to silence this")
        return None

    def view(trainer) -> Pretrained:  # the weights the offline probe would read: the EMA when the run keeps one
        weights = trainer.ema.module if trainer.ema is not None else model
        return Pretrained(None, cfg.data, cfg.diffusion, weights, tokenizer, denoiser)

    probe = OnlineProbe(cfg.online_probe, view, fit, test, amp_dtype(cfg.run.precision, s.ctx.device), cfg.run.seed,
                        cfg.data.num_workers)
    if s.ctx.is_main:
        console.print(probe.title())
    return probe


def main(config: str | None, overrides: list[str], flags: dict, resume: str | None = None, force: bool = False,
         cont: bool = False) -> Path:
    if config is None and resume is None:
        raise LdaeError("pretrain needs --config (e.g. --config final.yaml, or a row such as trajectory/T3.5) "
                        "or --resume RUN_DIR")
    cfg, ckpt = load_run_config(PretrainConfig, "pretrain", config, overrides, flags, resume, RESUMABLE, cont)
    return run(cfg, config, ckpt, force)
