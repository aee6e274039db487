"""`ldae probe`: linear probing of a pretrained encoder, MAE protocol (SPEC §5), several lrs at once.

The encoder is the pretrain checkpoint folded at fixed t into a plain ViT (clean input by default,
or the level-t latent noise added), cut at any block, average-pooled. Two modes:

- full (the paper's protocol): random-resized crop + flip every epoch, features recomputed each
  step, heads trained by LARS on the global batch; checkpoints and exact resume like pretrain.
- fast (small data): features extracted once from center crops, heads trained on the cached
  features, plus weighted k-NN accuracy from the same features.

Baselines read against every result: `--random-init` (the same ViT, untrained) and
`probe.features: pixels` (the same head on raw pixels).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from rich.table import Table

from ldae_cli.checkpoint import Checkpoint, load_checkpoint, read_metadata, save_checkpoint
from ldae_cli.config import load_config, save_resolved, to_dict
from ldae_cli.data import BadImageCounter, DataConfig, ImageDataset, StepBatches, build_dataset, epoch_order, \
    make_loader, to_unit_range
from ldae_cli.distributed import DistContext, all_gather_cat, init, shutdown
from ldae_cli.engine import LossMeter, RunConfig, TrainLoop, amp_dtype, check_resume_config, optimizer_tensors, \
    open_run_dir, restore_run, resume_base
from ldae_cli.engine_probe import HeadSchedule, ProbeHeads, evaluate, knn_accuracy, lars_for_heads, loss_terms, \
    steps_for, train_step, with_lowest
from ldae_cli.errors import LdaeError
from ldae_cli.models import build_timm_vit
from ldae_cli.pretrained import DEFAULT_T, fold_encoder, load_pretrained
from ldae_cli.reporting import MetricsLog, console, progress_bar

CHECKPOINT = "probe.safetensors"
RESUMABLE_CHANGES = ("data.path", "data.num_workers", "data.cache", "data.on_bad_image", "run.device",
                     "run.log_every", "run.save_every", "run.time_limit_minutes", "run.stop_after_steps",
                     "run.progress", "run.out_dir", "probe.extract_batch")


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


@dataclass
class ProbeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    run: RunConfig = field(default_factory=lambda: RunConfig(save_every=1000, log_every=50))


# ---------------------------------------------------------------------------------------------
# The frozen feature extractor
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoder:
    fn: Callable[[torch.Tensor, int], torch.Tensor]  # (uint8 images on device, seed) -> (B, dim)
    dim: int
    description: str
    parents: list[dict]


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """timm's ViT initialisation (trunc-normal 0.02 weights, zero biases) for every linear layer, gates included.

    The adaLN-Zero init of a fresh DenoisingViT would make every block the identity, a baseline
    weaker than any random network; this keeps the architecture and makes it a real random one.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen).clamp_(-2, 2) * 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def build_encoder(cfg: ProbeConfig, ckpt_path: str | None, random_init: bool, device: torch.device) -> Encoder:
    settings = cfg.probe
    amp = amp_dtype(cfg.run.precision, device)
    if settings.features == "pixels":
        dim = 3 * cfg.data.image_size ** 2
        return Encoder(lambda images, seed: to_unit_range(images).flatten(1), dim, "raw pixels", [])
    if ckpt_path is None:
        raise LdaeError("probe needs --ckpt (a pretrain checkpoint), also for --random-init (its architecture)")
    pre = load_pretrained(ckpt_path, settings.ema)
    if cfg.data.image_size != pre.image_size:
        raise LdaeError(f"data.image_size is {cfg.data.image_size} but {ckpt_path} was pretrained at "
                        f"{pre.image_size}; probe at the pretraining size")
    if random_init:
        randomize(pre.model, cfg.run.seed)
    t = settings.t
    depth = settings.depth or pre.model.encoder_depth
    description = ("random-init network (same architecture, untrained)" if random_init else
                   f"l-DAE encoder at t={t}") + f", {depth} blocks"
    denoiser = pre.denoiser.to(device)
    foldable = pre.cfg.diffusion.input_space == "image" or pre.tokenizer.is_linear
    if foldable:  # the plain ViT that fine-tuning and detection start from
        state, kwargs = fold_encoder(pre, t, depth)
        vit = build_timm_vit(kwargs)
        vit.load_state_dict(state, strict=True)
        net, dim = vit.to(device).eval().requires_grad_(False), kwargs["embed_dim"]
        encode = net
    else:  # a conv tokenizer in front: read its latents with the adaLN network itself
        net, dim = pre.model.to(device).eval().requires_grad_(False), pre.model.spec["width"]
        encode = None
        description += f" on {pre.tokenizer.kind} latents"

    @torch.no_grad()
    def features(images: torch.Tensor, seed: int) -> torch.Tensor:
        x = to_unit_range(images)
        if settings.noisy_input:
            z0 = denoiser.tokenizer.encode(x)
            gen = torch.Generator(device=device).manual_seed(seed)
            eps = torch.randn(z0.shape, generator=gen, device=device)
            zt, _ = denoiser.noisy_input(z0, torch.full((len(x),), t, device=device), eps)
            x = denoiser.tokenizer.decode(zt, denoiser.grid)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if encode is not None:
                return encode(x).float()
            tokens = denoiser.tokenizer.encode(x)
            return net.features(tokens, torch.full((len(x),), t, device=device), depth).mean(1).float()

    if settings.noisy_input:
        description += ", noisy input"
    return Encoder(features, dim, description, [pre.ckpt.parent_ref("pretrain")])


@torch.no_grad()
def extract(encoder: Encoder, dataset: ImageDataset, cfg: ProbeConfig, device: torch.device, ctx: DistContext,
            label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image (center crops), each rank a contiguous shard, gathered on all ranks."""
    n = len(dataset)
    lo, hi = n * ctx.rank // ctx.world, n * (ctx.rank + 1) // ctx.world
    step = cfg.probe.extract_batch
    batches = [list(range(i, min(i + step, hi))) for i in range(lo, hi, step)]
    bad = BadImageCounter(cfg.data.on_bad_image)
    feats, labels = [], []
    with progress_bar("img", cfg.run.progress and ctx.is_main) as bar:
        task = bar.add_task(f"features ({label})", total=hi - lo, info="")
        for keys, batch in zip(batches, make_loader(dataset, batches, cfg.data.num_workers,
                                                    pin_memory=device.type == "cuda")):
            batch = bad.check(batch)
            feats.append(encoder.fn(batch.images.to(device, non_blocking=True), cfg.run.seed * 7919 + keys[0]).cpu())
            labels.append(batch.labels)
            bar.update(task, advance=len(keys))
    return all_gather_cat(torch.cat(feats), ctx), all_gather_cat(torch.cat(labels), ctx)


# ---------------------------------------------------------------------------------------------
# Training the heads
# ---------------------------------------------------------------------------------------------

def lrs_of(settings: ProbeSettings, batch: int) -> list[float]:
    return [blr * batch / 256 for blr in settings.blrs]


def train_fast(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig, device: torch.device,
               metrics: MetricsLog) -> tuple[ProbeHeads, torch.optim.Optimizer, torch.Tensor]:
    """Heads trained on cached features; also returns each head's loss at the last step."""
    s = cfg.probe
    n = len(feats)
    batch = min(s.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = steps_for(n, batch, s.epochs)
    schedule = HeadSchedule(total, round(s.warmup_epochs * steps_per_epoch))
    torch.manual_seed(cfg.run.seed)
    heads = ProbeHeads(feats.shape[1], num_classes, len(s.blrs)).to(device)
    optimizer = lars_for_heads(heads, lrs_of(s, batch), s.momentum, s.weight_decay)
    feats, labels = feats.to(device), labels.to(device)
    meter = LossMeter(loss_terms(s.blrs), device)
    with progress_bar("step", cfg.run.progress) as bar:
        task = bar.add_task("heads", total=total, info="")
        for step in range(total):
            epoch, within = divmod(step, steps_per_epoch)
            idx = epoch_order(n, cfg.run.seed, epoch)[within * batch:(within + 1) * batch].to(device)
            losses = train_step(heads, optimizer, feats[idx], labels[idx], step, schedule)
            meter.add_all(with_lowest(losses))
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == total:
                means = meter.take()
                if not math.isfinite(means["loss"]):
                    raise LdaeError(f"every probe head diverged by step {step + 1}; lower probe.blrs "
                                    f"(now {s.blrs})")
                metrics.write({"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3), **means})
                bar.update(task, info=f"lowest head loss {means['loss']:.3f}")
            bar.update(task, advance=1)
    return heads, optimizer, losses


def train_full(encoder: Encoder, dataset: ImageDataset, num_classes: int, cfg: ProbeConfig, device: torch.device,
               ctx: DistContext, out_dir: Path, metrics: MetricsLog, resume: Checkpoint | None,
               save: Callable) -> tuple[ProbeHeads, torch.optim.Optimizer, int, bool]:
    """The MAE protocol: fresh augmented crops every step; returns (heads, optimizer, total steps, finished)."""
    s = cfg.probe
    batch = s.batch_size
    batches = StepBatches(len(dataset), batch, cfg.run.seed, ctx.rank, ctx.world)
    total = max(1, round(s.epochs * batches.steps_per_epoch))
    schedule = HeadSchedule(total, round(s.warmup_epochs * batches.steps_per_epoch))
    torch.manual_seed(cfg.run.seed)
    heads = ProbeHeads(encoder.dim, num_classes, len(s.blrs)).to(device)
    optimizer = lars_for_heads(heads, lrs_of(s, batch), s.momentum, s.weight_decay)
    start = restore_run(resume, ctx, total, {"heads": heads}, optimizer)
    batches.start_step, batches.total_steps = start, total
    # one rank's share of a step arrives as extract_batch-sized pieces
    per_rank = batch // ctx.world
    pieces = [list(range(i, min(i + s.extract_batch, per_rank))) for i in range(0, per_rank, s.extract_batch)]

    def split(step_keys):
        return [[step_keys[i] for i in piece] for piece in pieces]

    class Pieces:  # the DataLoader's batch sampler: each step's keys cut into encoder-sized pieces
        def __iter__(self):
            for keys in batches:
                yield from split(keys)

    data_iter = iter(make_loader(dataset, Pieces(), cfg.data.num_workers, pin_memory=device.type == "cuda"))
    bad = BadImageCounter(cfg.data.on_bad_image)
    meter = LossMeter(loss_terms(s.blrs), device)
    with TrainLoop("probe", cfg.run, out_dir, ctx, start, total, batches.steps_per_epoch, batch) as loop:
        while loop.running:
            feats, labels = [], []
            for k in range(len(pieces)):
                b = bad.check(next(data_iter))
                feats.append(encoder.fn(b.images.to(device, non_blocking=True),
                                        cfg.run.seed * 7919 + loop.step * 131 + k))
                labels.append(b.labels.to(device))
            feats = all_gather_cat(torch.cat(feats), ctx)
            labels = all_gather_cat(torch.cat(labels), ctx)
            losses = train_step(heads, optimizer, feats, labels, loop.step, schedule)
            meter.add_all(with_lowest(losses))
            if loop.end_step(metrics, meter, "Every head diverged: lower probe.blrs",
                             lambda step: save(heads, optimizer, step, total, finished=step == total)):
                return heads, optimizer, total, False, losses
    return heads, optimizer, total, True, losses


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

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


def run(cfg: ProbeConfig, ckpt: str | None, random_init: bool = False, config_name: str | None = None,
        resume: Checkpoint | None = None) -> dict:
    ctx = init(cfg.run.device)
    device = ctx.device
    try:
        name = config_name or ("random-init" if random_init else cfg.probe.features if cfg.probe.features != "encoder"
                               else (Path(ckpt).parent.name if ckpt else "probe"))
        out_dir = open_run_dir("probe", "probe", cfg.run.out_dir, name, resume, CHECKPOINT)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, out_dir / "config.yaml")
        encoder = build_encoder(cfg, ckpt, random_init, device)
        train_ds = build_dataset(cfg.data, "train", augment=not cfg.probe.fast, seed=cfg.run.seed)
        eval_ds = build_dataset(cfg.data, "eval", augment=False, seed=cfg.run.seed)
        num_classes = train_ds.num_classes
        if num_classes < 2:
            raise LdaeError(f"probing needs labelled data with 2+ classes; {cfg.data.source} gives {num_classes}")
        if ctx.is_main:
            console.print(f"probe: {encoder.description}; {len(train_ds):,} train / {len(eval_ds):,} eval images, "
                          f"{num_classes} classes, {'fast (cached features)' if cfg.probe.fast else 'full protocol'}")
        metrics = MetricsLog(out_dir / "metrics.jsonl", ctx.is_main,
                             truncate_after_step=resume.extra["step"] if resume is not None else None)
        batch = min(cfg.probe.batch_size, len(train_ds)) if cfg.probe.fast else cfg.probe.batch_size
        lrs = lrs_of(cfg.probe, batch)

        def save(heads, optimizer, step, total, finished, results=None):
            if not ctx.is_main:
                return
            tensors = {f"heads.{k}": v for k, v in heads.state_dict().items()}
            opt_tensors, opt_rest = optimizer_tensors(optimizer)
            tensors.update(opt_tensors)
            extra = {"step": step, "total_steps": total, "finished": finished, "optimizer": opt_rest,
                     "blrs": cfg.probe.blrs, "lrs": lrs, "encoder": encoder.description,
                     "random_init": random_init, "class_names": train_ds.classes, "results": results}
            save_checkpoint(out_dir / CHECKPOINT, "probe", tensors, to_dict(cfg), encoder.parents, extra)

        started = time.time()
        knn = None
        if cfg.probe.fast:
            train_f, train_y = extract(encoder, train_ds, cfg, device, ctx, "train")
            heads, optimizer, last_losses = train_fast(train_f, train_y, num_classes, cfg, device, metrics)
            total = steps_for(len(train_f), batch, cfg.probe.epochs)
        else:
            heads, optimizer, total, finished, last_losses = train_full(encoder, train_ds, num_classes, cfg, device,
                                                                        ctx, out_dir, metrics, resume, save)
            if not finished:
                return {}
        eval_f, eval_y = extract(encoder, eval_ds, cfg, device, ctx, "eval")
        acc = evaluate(heads, eval_f.to(device), eval_y.to(device))
        if cfg.probe.fast:
            knn = knn_accuracy(train_f.to(device), train_y.to(device), eval_f.to(device), eval_y.to(device),
                               cfg.probe.knn_k, cfg.probe.knn_temperature, num_classes)
        # null: the head diverged (its last-step loss is not finite)
        rows = [{"blr": b, "lr": lr, "train_loss": float(loss) if loss.isfinite() else None,
                 "top1": round(float(acc[1][i]), 2), "top5": round(float(acc[5][i]), 2)}
                for i, (b, lr, loss) in enumerate(zip(cfg.probe.blrs, lrs, last_losses.cpu()))]
        best = max(range(len(rows)), key=lambda i: rows[i]["top1"])
        results = {"encoder": encoder.description, "heads": rows, "best_head": best, "best_top1": rows[best]["top1"],
                   "knn_top1": None if knn is None else round(knn, 2), "checkpoint": ckpt,
                   "random_init": random_init, "features": cfg.probe.features, "t": cfg.probe.t,
                   "depth": cfg.probe.depth, "noisy_input": cfg.probe.noisy_input, "fast": cfg.probe.fast,
                   "eval_split": cfg.data.split_name("eval"), "seconds": round(time.time() - started, 1)}
        if ctx.is_main:
            save(heads, optimizer, total, total, True, results)
            (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
            console.print(results_table(rows, knn, f"linear probe: {encoder.description}"))
            console.print(f"best head * is chosen on the {results['eval_split']} split; wrote {out_dir / 'results.json'}"
                          f" and {out_dir / CHECKPOINT}")
        return results
    finally:
        shutdown(ctx)


def run_from_cli(config: str | None, overrides: list[str], flags: dict, resume: str | None = None, *,
                 ckpt: str | None, random_init: bool) -> dict:
    resume_ckpt = None
    if resume is not None:
        path = Path(resume) / CHECKPOINT if Path(resume).is_dir() else Path(resume)
        resume_ckpt = load_checkpoint(path, "probe")
        if resume_ckpt.extra.get("finished"):
            raise LdaeError(f"{path}: this probe run already finished")
        base = resume_base(resume_ckpt.config)
        ckpt = ckpt or next((p["path"] for p in resume_ckpt.provenance.get("parents", [])), None)
        random_init = resume_ckpt.extra["random_init"]
    else:
        base = default_config(ckpt)
    cfg = load_config(ProbeConfig, config, overrides, flags, base=base)
    if resume_ckpt is not None:
        check_resume_config(resume_ckpt.config, to_dict(cfg), RESUMABLE_CHANGES)
    return run(cfg, ckpt, random_init, Path(config).stem if config else None, resume_ckpt)
