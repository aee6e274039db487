"""The fine-tuning loop (MAE protocol): timm's RandAugment, random erasing, Mixup/CutMix with label
smoothing, layer-wise lr decay, EMA; per-epoch top-1/top-5 of the raw and the EMA weights; best and
last checkpoints; exact resume; DDP; NaN guard; progress and metrics.

timm's augmentations and drop path draw from the global Python, NumPy and torch RNGs. RandAugment
is seeded by the sample's aug_seed (keyed by seed, epoch and index in the data layer); erasing,
mixup and the forward pass (drop path) run inside `seeded_rngs` with a key of (seed, step, rank,
micro-batch). A resumed run therefore repeats the uninterrupted one exactly for the same number of
ranks and micro-batches (mixup pairs samples within a micro-batch, as in MAE, so those counts are
part of the recipe).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, auto_augment
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from ldae_cli.checkpoint import Checkpoint, save_checkpoint
from ldae_cli.data import BadImageCounter, ImageDataset, make_loader, to_unit_range
from ldae_cli.distributed import DistContext, all_reduce_sum, barrier, ddp_wrap
from ldae_cli.engine import DIVERGED_HINT, LossMeter, OptimConfig, RunConfig, TrainLoop, amp_dtype, \
    finished_already, make_adamw, make_ema, optimizer_tensors, plan_steps, restore_run, set_lr
from ldae_cli.errors import LdaeError
from ldae_cli.plots import save_curves
from ldae_cli.reporting import MetricsLog, console, read_metrics

LAST = "checkpoint.safetensors"
BEST = "best.safetensors"
# RandAugment's fill colour: mid-grey is 0 in the [-1, 1] input range, as ImageNet's mean colour is 0
# after the mean/std normalisation MAE uses
FILL = (128, 128, 128)


@contextlib.contextmanager
def seeded_rngs(key: int, device: torch.device | None = None):
    """Seed Python's, NumPy's and torch's global RNGs from `key` for the block, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(key)
        np.random.seed(key & 0xFFFFFFFF)
        torch.manual_seed(key)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def step_key(seed: int, step: int, rank: int, micro: int) -> int:
    return (seed * 0x9E3779B1 + step * 0x85EBCA6B + rank * 0xC2B2AE35 + micro * 0x27D4EB2F) & 0x7FFFFFFFFFFF


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with the answer Pillow gave before version 13 for 0 bits (a black image).

    RandAugment's PosterizeIncreasing keeps 4 - int(0.4 * magnitude) bits, so 0 whenever the
    sampled magnitude reaches 10 (m9 with mstd 0.5: about one op in fifty); Pillow 13 raises there.
    """
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


class SeededRandAugment:
    """timm's RandAugment as a data-layer sample transform, seeded by the sample's aug_seed."""

    def __init__(self, config_str: str, image_size: int):
        hparams = {"translate_const": int(image_size * 0.45), "img_mean": FILL,
                   "interpolation": Image.Resampling.BICUBIC}
        try:
            self.transform = rand_augment_transform(config_str, hparams)
        except (AssertionError, ValueError, KeyError) as exc:
            raise LdaeError(f"aug.rand_augment '{config_str}' is not a timm RandAugment string like "
                            f"'rand-m9-mstd0.5-inc1' ({exc or type(exc).__name__})") from None
        for op in self.transform.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize

    def __call__(self, img: Image.Image, aug_seed: int) -> Image.Image:
        # timm's RandAugment.__call__ with its two global RNGs made local: the ops are chosen as it
        # chooses them, from a NumPy generator, and each op draws from Python's `random`, seeded here
        # (a save/restore of NumPy's global state would cost three times the augmentation itself)
        ra = self.transform
        ops = np.random.default_rng(aug_seed).choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None,
                                                     p=ra.choice_weights)
        state = random.getstate()
        random.seed(aug_seed)
        try:
            for op in ops:
                img = op(img)
        finally:
            random.setstate(state)
        return img


class BatchAugment:
    """[-1, 1] images and int labels -> erased, mixed images and soft targets (each row sums to 1).

    Without mixup/cutmix the targets are the label-smoothed one-hots, so a single soft-target
    cross-entropy serves every setting.
    """

    def __init__(self, num_classes: int, mixup: float, cutmix: float, prob: float, switch_prob: float,
                 mode: str, label_smoothing: float, erase_prob: float, erase_mode: str, erase_count: int):
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
                           label_smoothing=label_smoothing, num_classes=num_classes) \
            if (mixup > 0 or cutmix > 0) and prob > 0 else None
        self.erase = (erase_prob, erase_mode, erase_count) if erase_prob > 0 else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            prob, mode, count = self.erase
            images = RandomErasing(prob, mode=mode, max_count=count, device=images.device)(images)
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, mixup_target(labels, self.num_classes, 1.0, self.smoothing)


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's BEiT/MAE groups: block i gets lr scale decay^(depth+1-(i+1)); embeddings decay^(depth+1),
    head 1. No weight decay on 1-D parameters (norms, biases) and on the position embedding."""
    return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                    no_weight_decay_list=tuple(model.no_weight_decay()))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, batch: int, ctx: DistContext, num_workers: int,
             amp: torch.dtype | None, on_bad_image: str) -> dict:
    """Top-1, top-5 (top-k with k = min(5, classes)) and cross-entropy over the whole eval split."""
    was_training = model.training
    model.eval()
    device = ctx.device
    mine = list(range(ctx.rank, len(dataset), ctx.world))
    chunks = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # top1, top5, loss, count
    bad = BadImageCounter(on_bad_image)
    for b in make_loader(dataset, chunks, num_workers, pin_memory=device.type == "cuda"):
        b = bad.check(b)
        if not b.labels.numel():
            continue
        images = to_unit_range(b.images.to(device, non_blocking=True))
        labels = b.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(1).sum()
        sums[2] += nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
    all_reduce_sum(sums, ctx)
    model.train(was_training)
    n = max(1.0, float(sums[3]))
    return {"top1": 100 * float(sums[0]) / n, "top5": 100 * float(sums[1]) / n, "loss": float(sums[2]) / n,
            "images": int(sums[3])}


@dataclass
class FinetuneJob:
    """Everything the loop needs, built by the finetune stage."""

    model: nn.Module  # a timm VisionTransformer with its classification head
    train_set: ImageDataset
    eval_set: ImageDataset
    optim: OptimConfig
    layer_decay: float
    augment: BatchAugment
    run: RunConfig
    out_dir: Path
    config: dict
    describe: dict  # written into every checkpoint's extra: timm kwargs, classes, init, ...
    parents: list[dict] = field(default_factory=list)
    num_workers: int = 2
    on_bad_image: str = "error"
    resume_from: Checkpoint | None = None


def train(job: FinetuneJob, ctx: DistContext) -> Path:
    device = ctx.device
    cfg_o, cfg_r = job.optim, job.run
    plan = plan_steps(len(job.train_set), cfg_o, cfg_r.seed, ctx)
    batches, micro, accum, base_lr = plan.batches, plan.micro, plan.accum, plan.base_lr
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    amp = amp_dtype(cfg_r.precision, device)

    model = job.model.to(device)
    optimizer = make_adamw(layer_decay_groups(model, cfg_o.weight_decay, job.layer_decay), cfg_o, device)
    ema = make_ema(model, cfg_o.ema)
    runner: nn.Module = model
    if ctx.enabled:
        runner = ddp_wrap(model, ctx)
    if cfg_r.compile:
        runner = torch.compile(runner)
    criterion = SoftTargetCrossEntropy()

    start_step = restore_run(job.resume_from, ctx, total_steps,
                             {"model": model, "ema": ema.module if ema is not None else None}, optimizer)
    best = job.resume_from.extra["best"] if job.resume_from is not None else {"top1": -1.0}

    metrics = MetricsLog(job.out_dir / "metrics.jsonl", ctx.is_main,
                         truncate_after_step=start_step if job.resume_from is not None else None)

    def describe(step_done: int) -> dict:
        return {**job.describe, "step": step_done, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                "epoch": step_done / steps_per_epoch, "finished": step_done == total_steps, "best": best,
                "world_size": ctx.world, "has_ema": ema is not None}

    def save_last(step_done: int) -> None:
        if ctx.is_main:
            extra = describe(step_done)
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
            opt_tensors, extra["optimizer"] = optimizer_tensors(optimizer)
            tensors.update(opt_tensors)
            save_checkpoint(job.out_dir / LAST, "finetune", tensors, job.config, job.parents, extra)
            records = read_metrics(metrics.path)
            save_curves(records, job.out_dir / "loss.png", ("loss", "eval_loss", "ema_eval_loss"),
                        title=f"fine-tune loss ({job.out_dir.name})")
            save_curves(records, job.out_dir / "accuracy.png", ("top1", "ema_top1", "top5", "ema_top5"), x="epoch",
                        title=f"fine-tune eval accuracy % ({job.out_dir.name})", log_y=False)
        barrier(ctx)

    def run_eval(step_done: int) -> dict:
        """Evaluate raw and EMA weights, log them, and write best.safetensors when either sets a record."""
        results = {"raw": evaluate(model, job.eval_set, micro, ctx, job.num_workers, amp, job.on_bad_image)}
        if ema is not None:
            results["ema"] = evaluate(ema.module, job.eval_set, micro, ctx, job.num_workers, amp, job.on_bad_image)
        kind = max(results, key=lambda k: results[k]["top1"])
        if results[kind]["top1"] > best["top1"]:
            best.clear()
            best.update(top1=results[kind]["top1"], top5=results[kind]["top5"], weights=kind, step=step_done,
                        epoch=round(step_done / steps_per_epoch, 4))
            if ctx.is_main:
                weights = (ema.module if kind == "ema" else model).state_dict()
                save_checkpoint(job.out_dir / BEST, "finetune", {f"model.{k}": v for k, v in weights.items()},
                                job.config, job.parents, {**describe(step_done), "weights": kind, "eval": results})
            barrier(ctx)
        record = {"step": step_done, "epoch": round(step_done / steps_per_epoch, 4)}
        for kind, r in results.items():
            prefix = "" if kind == "raw" else "ema_"
            record.update({f"{prefix}top1": r["top1"], f"{prefix}top5": r["top5"], f"{prefix}eval_loss": r["loss"]})
        metrics.write({**record, "best_top1": best["top1"]})
        return results

    if finished_already(start_step, total_steps, ctx):
        return job.out_dir / LAST

    batches.start_step, batches.total_steps = start_step, total_steps
    data_iter = iter(make_loader(job.train_set, batches, job.num_workers, pin_memory=device.type == "cuda"))
    bad = BadImageCounter(job.on_bad_image)
    meter = LossMeter(("loss",), device)
    if ctx.is_main:
        console.print(f"finetune: {len(job.train_set):,} train / {len(job.eval_set):,} eval images, batch "
                      f"{cfg_o.batch_size} ({ctx.world} rank(s) x {accum} x {micro}), {total_steps:,} steps "
                      f"({cfg_o.epochs:g} epochs), lr {base_lr:.3g}, layer decay {job.layer_decay:g}, "
                      f"device {device}")
    model.train()
    with TrainLoop("finetune", cfg_r, job.out_dir, ctx, start_step, total_steps, steps_per_epoch,
                   cfg_o.batch_size) as loop:
        while loop.running:
            step = loop.step
            lr = plan.lr(step)
            set_lr(optimizer, lr)
            for k in range(accum):
                batch = bad.check(next(data_iter))
                images = to_unit_range(batch.images.to(device, non_blocking=True))
                labels = batch.labels.to(device, non_blocking=True)
                sync = runner.no_sync() if ctx.enabled and k < accum - 1 else contextlib.nullcontext()
                with seeded_rngs(step_key(cfg_r.seed, step, ctx.rank, k), device), sync:
                    images, targets = job.augment(images, labels)
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        logits = runner(images)
                    loss = criterion(logits.float(), targets)
                    (loss / accum).backward()
                meter.add("loss", loss.detach().double() * labels.numel(), labels.numel())
            if cfg_o.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg_o.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            epoch_end = (step + 1) % steps_per_epoch == 0 or step + 1 == total_steps
            loop.advance(save_now=epoch_end)
            if loop.due_log:
                loop.log(metrics, meter, DIVERGED_HINT, lr=lr, skipped_images=bad.skipped)
            if epoch_end:
                results = run_eval(loop.step)
                if ctx.is_main:
                    summary = "  ".join(f"{kind} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}"
                                        for kind, r in results.items())
                    loop.console.print(f"epoch {loop.epoch:.2f}: {summary}")
            if loop.due_save:
                save_last(loop.step)
                loop.saved()
            if loop.stopped():
                break
    if ctx.is_main and not loop.running:
        console.print(f"finished {total_steps:,} steps in {loop.seconds:.0f}s; best top-1 "
                      f"{best['top1']:.2f} ({best.get('weights')} weights, epoch {best.get('epoch')}); wrote "
                      f"{job.out_dir / LAST}, {job.out_dir / BEST} and accuracy.png")
    return job.out_dir / LAST
