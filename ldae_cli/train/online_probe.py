"""The online probe: is a pretraining run learning? k-NN and quick linear heads on the encoder being trained, a
few times per run, at a bounded share of its compute (the fit subset shrinks to stay within it).

It fits on a class-balanced seeded subset of the train split (at most `fit_images`) and tests on a seeded subset
of the eval split; metrics.jsonl records both sizes and TensorBoard draws it in a chart of its own titled with
them. Below `per_class` fit images per class (too few training images, or a share that pays for fewer) it is off,
and the start and --dry-run say why; a measured share over `max_share` makes it probe less often, said in the log.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import partial
from typing import Callable

import torch

from ldae_cli.data.pipeline import ImageDataset, build_dataset
from ldae_cli.data.sources import open_source
from ldae_cli.errors import LdaeError
from ldae_cli.model.pretrained import Pretrained, encoder_features
from ldae_cli.runs.distributed import DistContext, all_reduce_sum
from ldae_cli.runs.logs import console
from ldae_cli.seeds import derived, epoch_order
from ldae_cli.settings.optim import lr_at, plan_steps, set_lr
from ldae_cli.settings.training import OnlineProbeConfig, block_forwards
from ldae_cli.train.heads import ProbeHeads, evaluate, extract, head_step, knn_accuracy, lars_for_heads
from ldae_cli.train.trainer import Hook, Trainer


def probe_every(s: OnlineProbeConfig, total_steps: int) -> int:
    """Steps between online probes: `s.every`, or a quarter of the run (the last probe falls on the final step)."""
    return s.every or math.ceil(total_steps / 4)


def online_fit_per_class(
    s: OnlineProbeConfig,
    train_images: int,
    block_forwards: int,
    encoder_depth: int,
    total_steps: int,
    num_classes: int,
    test_images: int | None = None,
) -> int:
    """Fit images per class: as many as `s.fit_images` holds, fewer where the probes would take more than
    `s.max_share` of the run (0 or less: not even the test images). The cost model: a training image costs
    `block_forwards` forwards of a block (settings.training.block_forwards), a probed image one forward of the
    encoder's, and the run probes `probes` times the fit and `test_images` (default `s.test_images`);
    `train_images` is what the whole run trains on (steps x batch)."""
    probes = math.ceil(total_steps / probe_every(s, total_steps))
    affordable = s.max_share * train_images * block_forwards / encoder_depth / probes
    tested = s.test_images if test_images is None else test_images
    return min(s.fit_images, int(affordable) - tested) // num_classes


def online_fit_size(cfg, ctx, images: int, classes: int, test_images: int) -> int:
    """Fit images per class for a pretrain config `cfg` over `images` labelled training images in `classes` classes
    and a test subset of `test_images`; an LdaeError saying why when that is below the floor (the probe is off)."""
    s = cfg.online_probe
    if classes < 2 or test_images == 0:
        raise LdaeError("no usable labelled train and evaluation splits (it has no labelled images)")
    if images // classes < s.per_class:
        raise LdaeError(
            f"{images:,} training images over {classes} classes give {images // classes} per class, "
            f"below its floor of {s.per_class} (online_probe.per_class)"
        )
    total = plan_steps(images, cfg.optim, cfg.run.seed, ctx).total_steps
    per_class = online_fit_per_class(
        s,
        total * cfg.optim.batch_size,
        block_forwards(cfg.objective, cfg.model),
        cfg.model.resolved()[1],
        total,
        classes,
        test_images,
    )
    if per_class < s.per_class:
        raise LdaeError(
            f"its {s.max_share:.0%} share of the run (online_probe.max_share) pays for "
            f"{max(per_class, 0)} fit images per class, below its floor of {s.per_class} "
            "(online_probe.per_class)"
        )
    return min(per_class, images // classes)


def online_plan(cfg, ctx) -> str:
    """The plan's line on the online probe (--dry-run): on, with its fit and test sizes, or off and why."""
    if not cfg.online_probe.enabled:
        return "online probe: off (online_probe.enabled is false)"
    try:
        train, held = open_source(cfg.data, "train"), open_source(cfg.data, "eval")
    except LdaeError as exc:
        return f"online probe: off: no usable labelled train and evaluation splits ({exc})"
    tested = min(cfg.online_probe.test_images, len(held)) if len(held.classes) >= 2 else 0
    try:
        per_class = online_fit_size(cfg, ctx, min(len(train), cfg.data.limit or len(train)), len(train.classes), tested)
    except LdaeError as exc:
        return f"online probe: off: {exc}"
    return f"online probe: on: fit up to {per_class:,} train images per class, test {tested:,} eval images"


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> list[int]:
    """Indices of a seeded random `per_class` images of each class (all of a class that has fewer), sorted."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class, position = torch.sort(labels[order], stable=True)  # each class's images in the seeded order
    first = torch.searchsorted(by_class, by_class)  # where each image's class starts
    rank = torch.arange(len(labels)) - first
    return sorted(order[position[rank < per_class]].tolist())


def online_subsets(cfg, ctx: DistContext) -> tuple[ImageDataset, ImageDataset]:
    """The online probe's (fit, test) subsets for a pretrain config `cfg`: class-balanced train images, as many as
    its cost share allows, and a seeded eval subset; center crops, decoded once when they fit in memory (as
    data.cache says). An LdaeError saying why when the probe is off."""
    s, plain = cfg.online_probe, replace(cfg.data, crop="center", hflip=False)
    try:
        test = build_dataset(replace(plain, limit=s.test_images), "eval", augment=False, seed=cfg.run.seed)
        train = build_dataset(replace(plain, cache="never"), "train", augment=False, seed=cfg.run.seed)
    except LdaeError as exc:
        raise LdaeError(f"no usable labelled train and evaluation splits ({exc})") from None
    per_class = online_fit_size(cfg, ctx, len(train), train.num_classes, len(test) if test.num_classes >= 2 else 0)
    picked = balanced_subset(train.labels_tensor(), per_class, derived(cfg.run.seed, "online fit subset"))
    raw = [train.subset[i] for i in picked] if train.subset is not None else picked
    fit = ImageDataset(train.source, train.size, subset=raw)
    if (
        cfg.data.cache != "never"
        and getattr(train.source, "stored_size", None) is None
        and (cfg.data.cache == "always" or len(fit) * 3 * fit.size**2 <= 2 * 1024**3)
    ):
        fit.materialize(cfg.data.num_workers, cfg.data.on_bad_image)
    return fit, test


def quick_linear(
    fit_f: torch.Tensor,
    fit_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    blrs: list[float],
    steps: int,
    batch: int,
    seed: int,
) -> float:
    """The probe's heads (BN + linear, LARS, one per blr) trained on cached features; the best head's top-1."""
    n = len(fit_f)
    batch = min(batch, n)
    per_epoch = max(1, n // batch)
    torch.manual_seed(seed)
    heads = ProbeHeads(fit_f.shape[1], num_classes, len(blrs)).to(fit_f.device)
    optimizer = lars_for_heads(heads, [b * batch / 256 for b in blrs])
    for step in range(steps):
        epoch, within = divmod(step, per_epoch)
        idx = epoch_order(n, seed, epoch)[within * batch : (within + 1) * batch].to(fit_f.device)
        set_lr(optimizer, lr_at(step, steps, max(1, steps // 10), 1.0))
        head_step(heads, optimizer, fit_f[idx], fit_y[idx])
    return float(evaluate(heads, test_f, test_y)[1].nan_to_num(0.0).max())


class OnlineProbe(Hook):
    """Every `every` steps and at the last one: features of the fit and test subsets from the weights being trained
    (the EMA when the run keeps one, as the offline probe reads), k-NN and linear top-1 into metrics.jsonl with the
    subset sizes, and on TensorBoard a chart of its own (Custom Scalars) titled with them. After each probe its
    measured share of this process's time is checked against max_share: over it, it probes that many times less
    often."""

    def __init__(
        self,
        settings: OnlineProbeConfig,
        view: Callable[[Trainer], Pretrained],
        fit: ImageDataset,
        test: ImageDataset,
        amp: torch.dtype | None,
        seed: int,
        num_workers: int,
    ):
        self.s, self.view, self.fit, self.test, self.amp, self.seed, self.num_workers = (
            settings,
            view,
            fit,
            test,
            amp,
            seed,
            num_workers,
        )
        self.per_class = max(fit.labels_tensor().bincount().tolist()) if len(fit) else 0
        self.seconds, self.count = 0.0, 0
        self.started = time.time()
        self.every: int | None = None  # the cadence: probe_every until a measured share lowers it
        self.layout = {"online probe": {self.title(): ["Multiline", ["online_knn_top1", "online_linear_top1"]]}}

    @property
    def images(self) -> int:
        """Images one probe reads."""
        return len(self.fit) + len(self.test)

    def title(self) -> str:
        return (
            f"online probe top-1 % (fit {len(self.fit):,} train images, {self.per_class}/class; "
            f"test {len(self.test):,} eval images)"
        )

    def due(self, trainer: Trainer) -> bool:
        self.every = self.every or probe_every(self.s, trainer.total_steps)
        return trainer.step % self.every == 0 or trainer.step == trainer.total_steps

    def keep_share(self, trainer: Trainer) -> None:
        """Probe less often when the probes so far took more than max_share of the time (the ranks' mean, so every
        rank keeps the same cadence)."""
        spent, elapsed = all_reduce_sum(
            torch.tensor([self.seconds, time.time() - self.started], dtype=torch.float64, device=trainer.device),
            trainer.ctx,
        ).tolist()
        share = spent / max(elapsed, 1e-9)
        if share > self.s.max_share and trainer.step < trainer.total_steps:
            slower = self.every * math.ceil(share / self.s.max_share)
            if trainer.ctx.is_main:
                console.print(
                    f"online probe: {share:.0%} of the run's time so far, over online_probe.max_share "
                    f"{self.s.max_share:.0%}: probing every {slower:,} steps instead of {self.every:,}"
                )
            self.every = slower

    def after_step(self, trainer):
        if not self.due(trainer):
            return
        started, device = time.time(), trainer.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            knn, linear = self.measure(self.view(trainer), trainer.ctx)
        spent = time.time() - started
        self.seconds, self.count = self.seconds + spent, self.count + 1
        self.keep_share(trainer)
        return {
            "online_knn_top1": round(knn, 2),
            "online_linear_top1": round(linear, 2),
            "online_probe_s": round(spent, 2),
            "online_fit_images": len(self.fit),
            "online_fit_per_class": self.per_class,
            "online_test_images": len(self.test),
        }

    def after_train(self, trainer):
        if self.count and trainer.ctx.is_main:
            console.print(
                f"online probe: {self.count} x {self.images} images, {self.seconds:.1f} s "
                f"({100 * self.seconds / (time.time() - self.started):.1f}% of this run's time)"
            )

    def measure(self, pre: Pretrained, ctx: DistContext) -> tuple[float, float]:
        """(k-NN top-1, best linear top-1) of `pre`'s encoder: fitted on the fit subset, tested on the test one."""
        s = self.s
        encoder = encoder_features(pre, s.t, None, False, ctx.device, self.amp)
        read = partial(extract, batch=s.batch, seed=self.seed, num_workers=self.num_workers, progress=False)
        fit_f, fit_y = (x.to(ctx.device) for x in read(encoder, self.fit, ctx, "online probe (fit)"))
        test_f, test_y = (x.to(ctx.device) for x in read(encoder, self.test, ctx, "online probe (test)"))
        classes = self.test.num_classes
        knn = knn_accuracy(fit_f, fit_y, test_f, test_y, s.knn_k, s.knn_temperature, classes)
        linear = quick_linear(
            fit_f, fit_y, test_f, test_y, classes, s.linear_blrs, s.linear_steps, s.linear_batch, self.seed
        )
        return knn, linear
