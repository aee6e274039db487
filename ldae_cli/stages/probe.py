"""`ldae probe`: linear probing of a pretrained encoder, MAE's protocol, several lrs at once.

The encoder is the pretrain checkpoint folded at fixed t into a plain ViT (clean input by default,
or the level-t latent noise added), cut at any block, average-pooled. Full mode (the paper's
protocol: crops and flips every epoch) or fast mode (features extracted once, plus k-NN); see
engine_probe.

Baselines read against every result: `--random-init` (the same ViT, untrained) and
`probe.features: pixels` (the same head on raw pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rich.table import Table

from ldae_cli import engine_probe
from ldae_cli.checkpoint import Checkpoint, read_metadata
from ldae_cli.data import DataConfig, build_dataset
from ldae_cli.errors import LdaeError
from ldae_cli.pretrained import DEFAULT_T, FeatureEncoder, encoder_features, load_pretrained, pixel_features
from ldae_cli.plots import save_probe_chart
from ldae_cli.reporting import console
from ldae_cli.config import require
from ldae_cli.runs import RunConfig, amp_dtype, load_run_config, session, verified_parent

RESUMABLE = ("probe.extract_batch",)


@dataclass
class ProbeSettings:
    t: int = DEFAULT_T
    depth: Optional[int] = None  # blocks of the encoder; null = the encoder/decoder split
    noisy_input: bool = False  # add the level-t latent noise to the input (the paper's default is clean)
    features: Literal["encoder", "pixels"] = "encoder"  # pixels: the raw-image baseline
    ema: Optional[bool] = None  # the pretrain EMA weights; null = when the run kept them
    fast: bool = False
    blrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])  # one head each
    batch_size: int = 16384
    epochs: float = 90.0
    warmup_epochs: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    knn_k: int = 20
    knn_temperature: float = 0.07
    extract_batch: int = 256  # images per encoder forward

    def validate(self) -> None:
        if not self.blrs or any(b <= 0 for b in self.blrs):
            raise LdaeError(f"probe.blrs: give one or more positive base learning rates, got {self.blrs}")
        if self.batch_size < 1 or self.epochs <= 0 or self.extract_batch < 1:
            raise LdaeError("probe.batch_size, probe.epochs and probe.extract_batch must be positive")
        require("probe", "a positive integer", lambda v: v > 0, depth=self.depth, knn_k=self.knn_k)
        require("probe", ">= 0", lambda v: v >= 0, t=self.t, warmup_epochs=self.warmup_epochs,
                weight_decay=self.weight_decay)
        require("probe", "> 0", lambda v: v > 0, knn_temperature=self.knn_temperature)
        require("probe", "in [0, 1)", lambda v: 0 <= v < 1, momentum=self.momentum)


@dataclass
class ProbeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    run: RunConfig = field(default_factory=lambda: RunConfig(save_every=1000, log_every=50))


def default_config(ckpt_path: str | None) -> dict:
    """The pretrain run's data (MAE probing crops for training), so `ldae probe --ckpt X` needs nothing else."""
    if ckpt_path is None:
        return {}
    meta = read_metadata(ckpt_path)
    if meta["kind"] != "pretrain":
        raise LdaeError(f"{ckpt_path}: is a '{meta['kind']}' checkpoint, expected 'pretrain'")
    data = {**meta["config"]["data"], "crop": "random-resized", "crop_scale": [0.08, 1.0], "hflip": True}
    return {"data": data}


def results_table(rows: list[dict], knn: float | None, title: str) -> Table:
    table = Table(title=title)
    for col in ("head", "blr", "lr", "train loss", "top-1", "top-5"):
        table.add_column(col, justify="right")
    best = max(range(len(rows)), key=lambda i: rows[i]["top1"])
    for i, r in enumerate(rows):
        mark = " *" if i == best else ""
        loss = "diverged" if r["train_loss"] is None else f"{r['train_loss']:.3g}"
        table.add_row(f"{i}{mark}", f"{r['blr']:.3g}", f"{r['lr']:.3g}", loss, f"{r['top1']:.2f}", f"{r['top5']:.2f}")
    if knn is not None:
        table.add_row("k-NN", "", "", "", f"{knn:.2f}", "")
    return table


def build_encoder(cfg: ProbeConfig, ckpt_path: str | None, random_init: bool, device) -> FeatureEncoder:
    settings = cfg.probe
    if settings.features == "pixels":
        return pixel_features(cfg.data.image_size)
    pre = load_pretrained(ckpt_path, settings.ema)
    if cfg.data.image_size != pre.image_size:
        raise LdaeError(f"data.image_size is {cfg.data.image_size} but {ckpt_path} was pretrained at "
                        f"{pre.image_size}; probe at the pretraining size")
    return encoder_features(pre, settings.t, settings.depth, settings.noisy_input, device,
                            amp_dtype(cfg.run.precision, device), cfg.run.seed if random_init else None)


def run(cfg: ProbeConfig, ckpt: str | None, random_init: bool = False, config_name: str | None = None,
        resume: Checkpoint | None = None, force: bool = False) -> dict:
    if ckpt is None and cfg.probe.features == "encoder":
        raise LdaeError("probe needs --ckpt (a pretrain checkpoint), also for --random-init (its architecture)")
    name = config_name or ("random-init" if random_init else cfg.probe.features if cfg.probe.features != "encoder"
                           else (Path(ckpt).parent.name if ckpt else "probe"))
    with session("probe", "probe", cfg, name, resume, force, config_file=config_name, resumable=RESUMABLE) as s:
        encoder = build_encoder(cfg, ckpt, random_init, s.ctx.device)
        train_ds = build_dataset(cfg.data, "train", augment=not cfg.probe.fast, seed=cfg.run.seed)
        eval_ds = build_dataset(cfg.data, "eval", augment=False, seed=cfg.run.seed)
        num_classes = train_ds.num_classes
        if num_classes < 2:
            raise LdaeError(f"probing needs labelled data with 2+ classes; {cfg.data.source} gives {num_classes}")
        if s.ctx.is_main:
            console.print(f"probe: {encoder.description}; {len(train_ds):,} train / {len(eval_ds):,} eval images, "
                          f"{num_classes} classes, {'fast (cached features)' if cfg.probe.fast else 'full protocol'}")
        about = {"checkpoint": ckpt, "random_init": random_init, "features": cfg.probe.features, "t": cfg.probe.t,
                 "depth": cfg.probe.depth, "noisy_input": cfg.probe.noisy_input}

        def show(rows: list[dict], knn: float | None) -> None:
            console.print(results_table(rows, knn, f"linear probe: {encoder.description}"))
            console.print(f"best head * is chosen on the {cfg.data.split_name('eval')} split; wrote "
                          f"{s.out_dir / 'results.json'} and {s.checkpoint}")

        results = engine_probe.train(s, encoder, train_ds, eval_ds, about, show)
        if results and s.ctx.is_main:  # {} when stopped early
            save_probe_chart(results, s.output("results.png"))
        return results


def main(config: str | None, overrides: list[str], flags: dict, resume: str | None = None, *,
         ckpt: str | None = None, random_init: bool = False, force: bool = False, cont: bool = False) -> dict:
    name = Path(config).stem if config else None
    base = default_config(ckpt) if resume is None else None
    cfg, resume_ckpt = load_run_config(ProbeConfig, "probe", config, overrides, flags, resume, RESUMABLE, cont, base)
    if resume_ckpt is None:
        return run(cfg, ckpt, random_init, name, force=force)
    resume_ckpt.require("random_init")
    if cont and bool(resume_ckpt.extra["random_init"]) != random_init:
        raise LdaeError(f"--continue: {resume_ckpt.path.parent} holds a probe "
                        f"{'with' if resume_ckpt.extra['random_init'] else 'without'} --random-init; pick another --out")
    if cfg.probe.features == "encoder":
        ckpt = verified_parent(resume_ckpt, "pretrain", ckpt)
    return run(cfg, ckpt, resume_ckpt.extra["random_init"], name, resume_ckpt)
