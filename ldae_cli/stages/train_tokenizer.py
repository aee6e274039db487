"""`ldae train-tokenizer`: train a conv VAE (optionally with VQGAN's perceptual and adversarial losses),
a patch VAE or a patch AE, then measure what pretrain needs and what the paper compares.

At the end of training the run measures the latent mean and std per token dim on training images
(what `tokenizer.latent_scale` divides by in pretrain), the PSNR of reconstructions on held-out
images, and (by default) the PSNR of a patch PCA with the same token footprint and d per token,
fitted on the same training images: the paper's Table 2 baseline. All of it goes into the
`tokenizer` checkpoint that `ldae pretrain --set tokenizer.kind=trained tokenizer.path=...` reads,
plus report.json and reconstructions.png in the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldae_cli.data.pipeline import BadImageCounter, ImageDataset, build_dataset, make_loader, to_unit_range
from ldae_cli.data.plots import psnr, save_grid
from ldae_cli.errors import LdaeError
from ldae_cli.model import pca
from ldae_cli.model.autoencoders import Autoencoder, build_autoencoder
from ldae_cli.model.tokenizers import PCATokenizer
from ldae_cli.runs.checkpoint import Checkpoint
from ldae_cli.runs.logs import console
from ldae_cli.runs.rundir import write_atomically
from ldae_cli.seeds import derived
from ldae_cli.train import engine_tokenizer
from ldae_cli.train.dryrun import Plan, outline, print_config
from ldae_cli.train.engine_tokenizer import RESUMABLE, TokenizerObjective, TrainTokenizerConfig
from ldae_cli.train.session import Session, load_run_config, refuse_force, session, settle_image_size


def _chunks(indices: list[int], size: int = 256) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _subset(n: int, count: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist()


@torch.no_grad()
def latent_statistics(
    net: Autoencoder, dataset: ImageDataset, count: int, seed: int, num_workers: int, on_bad_image: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per token dim of the posterior mean over `count` training images (float64 sums)."""
    device = next(net.parameters()).device
    total = torch.zeros(net.token_dim, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    n = 0
    bad = BadImageCounter(on_bad_image)
    for batch in make_loader(dataset, _chunks(_subset(len(dataset), count, seed)), num_workers):
        mean, _ = net.posterior(to_unit_range(bad.check(batch).images.to(device)))
        z = mean.double().reshape(-1, net.token_dim)
        total += z.sum(0)
        squares += z.square().sum(0)
        n += z.shape[0]
    if n < 2:
        raise LdaeError("no training images could be read to measure the latent statistics")
    mu = total / n
    var = (squares / n - mu.square()).clamp_min(0) * n / (n - 1)
    return mu.float().cpu(), var.sqrt().float().cpu()


@torch.no_grad()
def reconstruction_report(
    net: Autoencoder, cfg: TrainTokenizerConfig, train_set: ImageDataset, eval_set: ImageDataset, session: Session
) -> dict:
    """Test PSNR of the tokenizer (and of the same-size PCA), reconstructions.png and report.json."""
    device = next(net.parameters()).device
    grid = net.grid(eval_set.size)
    reference = None
    if cfg.report.pca_reference:
        settings = pca.PCAConfig(patch=net.patch, dim=net.token_dim, patches=cfg.report.pca_patches, seed=cfg.run.seed)
        console.print(
            f"fitting the reference PCA (p={net.patch}, d={net.token_dim}) on {settings.patches:,} training patches"
        )
        result = pca.fit(train_set, settings, cfg.data.on_bad_image, cfg.data.num_workers, cfg.run.progress)
        reference = PCATokenizer(result.mean, result.basis, result.eigenvalues, net.patch, net.token_dim).to(device)
    scores: dict[str, list[torch.Tensor]] = {"tokenizer": [], "pca": []}
    shown: list[list[torch.Tensor]] = []
    bad = BadImageCounter(cfg.data.on_bad_image)
    indices = _subset(len(eval_set), cfg.report.images, derived(cfg.run.seed, "held-out report"))
    for batch in make_loader(eval_set, _chunks(indices), cfg.data.num_workers):
        images = to_unit_range(bad.check(batch).images.to(device))
        recon = net.decode_tokens(net.posterior(images)[0], grid).clamp(-1, 1)
        scores["tokenizer"].append(psnr(images, recon).cpu())
        columns = [images, recon]
        if reference is not None:
            pca_recon = reference.decode(reference.encode(images), grid).clamp(-1, 1)
            scores["pca"].append(psnr(images, pca_recon).cpu())
            columns.append(pca_recon)
        for i in range(min(images.shape[0], cfg.report.grid_images - len(shown))):
            shown.append([c[i].cpu() for c in columns])
    if not scores["tokenizer"]:
        raise LdaeError(
            f"no held-out images could be read for the reconstruction report ({cfg.data.source}, "
            f"split '{cfg.data.split_name('eval')}')"
        )
    kind = net.spec["kind"]
    report = {
        "kind": kind,
        "patch": net.patch,
        "dim": net.token_dim,
        "split": cfg.data.split_name("eval"),
        "images": int(sum(len(s) for s in scores["tokenizer"])),
        "psnr": round(float(torch.cat(scores["tokenizer"]).mean()), 3),
    }
    titles = ["original", kind]
    if reference is not None:
        report["pca_psnr"] = round(float(torch.cat(scores["pca"]).mean()), 3)
        titles.append(f"pca d={net.token_dim}")
    save_grid(shown, session.output("reconstructions.png"), upscale=max(1, 96 // eval_set.size), titles=titles)
    write_atomically(session.output("report.json"), (json.dumps(report, indent=2) + "\n").encode())
    line = f"held-out PSNR ({report['images']} {report['split']} images): {kind} [bold]{report['psnr']:.2f} dB[/bold]"
    if reference is not None:
        line += f", PCA p={net.patch} d={net.token_dim} {report['pca_psnr']:.2f} dB"
    console.print(line)
    console.print(f"wrote {session.output('reconstructions.png')} and {session.output('report.json')}")
    return report


def run(
    cfg: TrainTokenizerConfig,
    config_name: str | None = None,
    resume_ckpt: Checkpoint | None = None,
    force: bool = False,
) -> Path:
    with session(
        "train-tokenizer",
        "tokenizer",
        cfg,
        config_name,
        resume_ckpt,
        force,
        config_file=config_name,
        resumable=RESUMABLE,
    ) as s:
        cfg.optim.accumulation(s.ctx.world)  # a batch the ranks cannot split fails now, not after data is read
        torch.manual_seed(cfg.run.seed)  # initial weights: identical on every rank
        net = build_autoencoder(cfg.tokenizer.spec())
        net.grid(cfg.data.settled_size)  # fail before any data is read
        full = net.patch**2 * 3
        if cfg.report.pca_reference and cfg.report.pca_patches <= full:
            raise LdaeError(
                f"report.pca_patches: the reference PCA of {net.patch}x{net.patch}x3 patches needs more "
                f"than {full} patches, got {cfg.report.pca_patches}"
            )
        objective = TokenizerObjective(net, cfg.loss)
        dataset = build_dataset(cfg.data, "train", seed=cfg.run.seed)
        # opened now so that a missing held-out split fails before training, not after it
        eval_set = build_dataset(cfg.data, "eval", augment=False, seed=cfg.run.seed) if s.ctx.is_main else None

        def finalize(trained: Autoencoder) -> tuple[dict[str, torch.Tensor], dict]:
            trained.eval()
            # statistics and the reference PCA describe the images pretrain will encode, not their flips or crops
            plain = (
                dataset
                if not (cfg.data.hflip or cfg.data.crop != "center")
                else build_dataset(cfg.data, "train", augment=False, seed=cfg.run.seed)
            )
            mean, std = latent_statistics(
                trained, plain, cfg.report.stats_images, cfg.run.seed, cfg.data.num_workers, cfg.data.on_bad_image
            )
            assert eval_set is not None  # finalize runs on the main rank only
            report = reconstruction_report(trained, cfg, plain, eval_set, s)
            return {"stats.mean": mean, "stats.std": std}, {"report": report}

        description = {"tokenizer": net.spec, "image_size": cfg.data.image_size, "dataset": cfg.data.source}
        engine_tokenizer.train(s, objective, dataset, finalize, description)
        return s.checkpoint


def dry_run(cfg: TrainTokenizerConfig, config_name: str | None, resume: Checkpoint | None, force: bool) -> Plan:
    """--dry-run: the checks and plan of a start; the step time is not estimated (GAN and perceptual losses)."""
    o = outline(
        cfg,
        "train-tokenizer",
        "tokenizer",
        config_name,
        config_name,
        resume,
        force,
        [cfg.data.split_name("train"), cfg.data.split_name("eval")],
    )
    net = build_autoencoder(cfg.tokenizer.spec())
    net.grid(cfg.data.settled_size)
    params = sum(p.numel() for p in net.parameters())
    return o.plan(
        "train-tokenizer",
        cfg,
        params,
        None,
        "not estimated for train-tokenizer: time a few steps with --set run.stop_after_steps=20",
    )


def settle(cfg: TrainTokenizerConfig) -> None:
    """A new run's null data.image_size is the images' own size in steps of the tokenizer's token footprint."""
    if cfg.data.image_size is None:
        settle_image_size(cfg.data, build_autoencoder(cfg.tokenizer.spec()).patch)


def main(
    config: str | None,
    overrides: list[str],
    flags: dict[str, Any],
    resume: str | None = None,
    force: bool = False,
    cont: bool = False,
    preview: str | None = None,
) -> Path | None:
    if config is None and resume is None:
        raise LdaeError("train-tokenizer needs --config (e.g. --config tokenizer/conv-vae) or --resume RUN_DIR")
    refuse_force(resume, cont, force)
    cfg, ckpt = load_run_config(
        TrainTokenizerConfig, "tokenizer", config, overrides, flags, resume, RESUMABLE, cont, adjust=settle
    )
    if preview == "config":
        print_config(cfg)
        return None
    if preview == "plan":
        dry_run(cfg, config, ckpt, force).show()
        return None
    return run(cfg, config, ckpt, force)
