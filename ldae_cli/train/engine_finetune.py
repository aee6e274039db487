"""Fine-tuning on the Trainer (MAE protocol): timm's RandAugment, random erasing, Mixup/CutMix with label
smoothing, layer-wise lr decay, EMA; per-epoch top-1/top-5 of the raw and the EMA weights and the best
checkpoint beside the run's own; DDP. The Trainer does checkpoints, exact resume, NaN guard and metrics.

timm's augmentations and drop path draw from the global Python, NumPy and torch RNGs. RandAugment
is seeded by the sample's aug_seed (keyed by seed, epoch and index in the data layer); erasing,
mixup and the forward pass (drop path) run inside `seeded_rngs` with a key of (seed, step, rank,
micro-batch). A resumed run therefore repeats the uninterrupted one exactly for the same number of
ranks and micro-batches (mixup pairs samples within a micro-batch, as in MAE, so those counts are
part of the recipe).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, auto_augment
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn

from ldae_cli.data.pipeline import BadImageCounter, ImageDataset, make_loader, to_unit_range
from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import save_checkpoint
from ldae_cli.runs.distributed import DistContext, all_reduce_sum, amp_dtype, barrier, no_sync
from ldae_cli.runs.logs import console
from ldae_cli.seeds import batch_seed, seeded_rngs
from ldae_cli.settings.evaluation import FinetuneConfig  # re-exported where it was
from ldae_cli.settings.evaluation import even_micro_batch as even_micro_batch
from ldae_cli.settings.optim import make_adamw, make_ema, plan_steps
from ldae_cli.train.hooks import Curve, Curves, Description, Evaluation, LogLine
from ldae_cli.train.session import Session
from ldae_cli.train.train_state import TrainState
from ldae_cli.train.trainer import Trainer, micro_batches

# a resumed run reads its weights from its own checkpoint, so the source (model.ckpt) may have moved
RESUMABLE = ("model.ckpt",)


# what a finetune checkpoint says about its network, carried over unchanged by --resume
DESCRIPTION_KEYS = ("timm_kwargs", "class_names", "num_classes", "image_size", "init")


BEST = "best.safetensors"


def without_ema(description: dict) -> dict:
    """best.safetensors holds one network, the raw or the EMA weights (`weights` says which), never both."""
    return {k: v for k, v in description.items() if k != "has_ema"}


# RandAugment's fill colour: mid-grey is 0 in the [-1, 1] input range, as ImageNet's mean colour is 0
# after the mean/std normalisation MAE uses
FILL = (128, 128, 128)


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
        hparams = {
            "translate_const": int(image_size * 0.45),
            "img_mean": FILL,
            "interpolation": Image.Resampling.BICUBIC,
        }
        try:
            self.transform = rand_augment_transform(config_str, hparams)
        except (AssertionError, ValueError, KeyError) as exc:
            raise LdaeError(
                f"aug.rand_augment '{config_str}' is not a timm RandAugment string like "
                f"'rand-m9-mstd0.5-inc1' ({exc or type(exc).__name__})"
            ) from None
        for op in self.transform.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize

    def __call__(self, img: Image.Image, aug_seed: int) -> Image.Image:
        # timm's RandAugment.__call__ with its two global RNGs made local: the ops are chosen as it
        # chooses them, from a NumPy generator, and each op draws from Python's `random`, seeded here
        # (a save/restore of NumPy's global state would cost three times the augmentation itself)
        ra = self.transform
        ops = np.random.default_rng(aug_seed).choice(
            ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights
        )
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

    def __init__(
        self,
        num_classes: int,
        mixup: float,
        cutmix: float,
        prob: float,
        switch_prob: float,
        mode: str,
        label_smoothing: float,
        erase_prob: float,
        erase_mode: str,
        erase_count: int,
    ):
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mixup = (
            Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=prob,
                switch_prob=switch_prob,
                mode=mode,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if (mixup > 0 or cutmix > 0) and prob > 0
            else None
        )
        self.erase = (erase_prob, erase_mode, erase_count) if erase_prob > 0 else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            prob, mode, count = self.erase
            images = RandomErasing(prob, mode=mode, max_count=count, device=images.device)(images)
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, mixup_target(labels, self.num_classes, 1.0, self.smoothing)


def layer_decay_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's BEiT/MAE groups: block i gets lr scale decay^(depth+1-(i+1)); embeddings decay^(depth+1),
    head 1. No weight decay on 1-D parameters (norms, biases) and on the position embedding."""
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, layer_decay=layer_decay, no_weight_decay_list=tuple(model.no_weight_decay())
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    batch: int,
    ctx: DistContext,
    num_workers: int,
    amp: torch.dtype | None,
    on_bad_image: str,
) -> dict:
    """Top-1, top-5 (top-k with k = min(5, classes)) and cross-entropy over the whole eval split."""
    was_training = model.training
    model.eval()
    device = ctx.device
    mine = list(range(ctx.rank, len(dataset), ctx.world))
    chunks = [mine[i : i + batch] for i in range(0, len(mine), batch)]
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
    return {
        "top1": 100 * float(sums[0]) / n,
        "top5": 100 * float(sums[1]) / n,
        "loss": float(sums[2]) / n,
        "images": int(sums[3]),
    }


def train(
    session: Session[FinetuneConfig],
    model: VisionTransformer,
    train_set: ImageDataset,
    eval_set: ImageDataset,
    augment: BatchAugment,
    description: dict,
    parents: list[dict],
) -> bool:
    """Fine-tune `model` (a timm ViT with its head); evaluates raw and EMA weights at every epoch's end and
    keeps best.safetensors. True when the run reached its last step."""
    cfg, ctx, device = session.cfg, session.ctx, session.ctx.device
    plan = plan_steps(len(train_set), cfg.optim, cfg.run.seed, ctx)
    amp = amp_dtype(cfg.run.precision, device)
    model.to(device)
    optimizer = make_adamw(layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay), cfg.optim, device)
    best = dict(session.resume.extra["best"]) if session.resume is not None else {"top1": -1.0}

    def describe() -> tuple[dict, dict]:
        return {}, {**description, "best": best, "has_ema": cfg.optim.ema is not None}

    def run_eval(step: int) -> dict:
        """Raw and EMA weights on the eval split; best.safetensors when either sets a record."""
        results = {"raw": evaluate(model, eval_set, plan.micro, ctx, cfg.data.num_workers, amp, cfg.data.on_bad_image)}
        if trainer.ema is not None:
            results["ema"] = evaluate(
                trainer.ema.module, eval_set, plan.micro, ctx, cfg.data.num_workers, amp, cfg.data.on_bad_image
            )
        kind = max(results, key=lambda k: results[k]["top1"])
        epoch = round(step / plan.steps_per_epoch, 4)
        if results[kind]["top1"] > best["top1"]:
            best.clear()
            best.update(top1=results[kind]["top1"], top5=results[kind]["top5"], weights=kind, step=step, epoch=epoch)
            if ctx.is_main:
                weights = (trainer.ema.module if kind == "ema" else model).state_dict()
                save_checkpoint(
                    session.output(BEST),
                    "finetune",
                    {f"model.{k}": v for k, v in weights.items()},
                    session.config,
                    parents,
                    {**without_ema(describe()[1]), "step": step, "epoch": epoch, "weights": kind, "eval": results},
                )
            barrier(ctx)
        record = {"step": step, "epoch": epoch}
        for kind, r in results.items():
            prefix = "" if kind == "raw" else "ema_"
            record.update({f"{prefix}top1": r["top1"], f"{prefix}top5": r["top5"], f"{prefix}eval_loss": r["loss"]})
        trainer.metrics.write({**record, "best_top1": best["top1"]})
        if ctx.is_main:
            console.print(
                f"epoch {epoch:.2f}: "
                + "  ".join(f"{kind} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}" for kind, r in results.items())
            )
        return results

    curves = (
        Curve("loss.png", ("loss", "eval_loss", "ema_eval_loss"), "fine-tune loss"),
        Curve(
            "accuracy.png",
            ("top1", "ema_top1", "top5", "ema_top5"),
            "fine-tune eval accuracy %",
            x="epoch",
            log_y=False,
        ),
    )
    evaluation = Evaluation(
        run_eval,
        every=lambda step: step % plan.steps_per_epoch == 0,
        summary=lambda: (
            (
                f"best top-1 {best['top1']:.2f} ({best['weights']} weights, epoch {best['epoch']}); wrote "
                f"{session.output(BEST)} and accuracy.png"
            )
            if "weights" in best
            else None
        ),
    )
    state = TrainState({"model": model}, {"optim": optimizer}, make_ema(model, cfg.optim.ema), parents)
    trainer = Trainer(session, plan, state, [LogLine(), Curves(*curves), Description(describe), evaluation])
    runner = trainer.wrap(model)
    stream = trainer.stream(train_set, cfg.data)
    criterion = SoftTargetCrossEntropy()

    def step(index: int) -> None:
        for k, batch in enumerate(micro_batches(stream, plan.accum, device)):
            labels = batch.labels
            sync = no_sync(runner, ctx.enabled and k < plan.accum - 1)
            with seeded_rngs(batch_seed(cfg.run.seed, index, ctx.rank, k), device), sync:
                images, targets = augment(to_unit_range(batch.images), labels)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = runner(images)
                loss = criterion(logits.float(), targets)
                (loss / plan.accum).backward()
            trainer.meter.add("loss", loss.detach().double() * labels.numel(), labels.numel())
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trainer.announce(
        f"{len(train_set):,} train / {len(eval_set):,} eval images",
        cfg.optim.base_lr(),
        f", layer decay {cfg.optim.layer_decay:g}",
    )
    model.train()
    return trainer.fit(step)
