"""The online probe: is a pretraining run learning? k-NN and quick linear heads on the encoder being trained, a
few times per run, at a bounded share of its compute (the fit subset shrinks to stay within it).

It fits on a class-balanced seeded subset of the train split (at least `per_class` images per class where the
share allows, at most `fit_images`) and tests on a seeded subset of the eval split; metrics.jsonl records both
sizes and TensorBoard draws it in a chart of its own titled with them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ldae_cli.config import require
from ldae_cli.data import ImageDataset, build_dataset
from ldae_cli.distributed import DistContext
from ldae_cli.errors import LdaeError
from ldae_cli.heads import ProbeHeads, evaluate, extract, head_step, knn_accuracy, lars_for_heads
from ldae_cli.optim import lr_at, plan_steps, set_lr
from ldae_cli.pretrained import DEFAULT_T, Pretrained, encoder_features
from ldae_cli.seeds import derived, epoch_order
from ldae_cli.trainer import Hook, Trainer


@dataclass
class OnlineProbeConfig:
    """k-NN and a quick linear probe of the encoder while it pretrains: fitted on a class-balanced seeded subset of
    the train split, tested on a seeded subset of the eval split."""

    enabled: bool = True  # runs whenever the dataset has labelled train and evaluation splits
    every: Optional[int] = None  # optimizer steps between probes; null = a quarter of the run (4 probes)
    fit_images: int = 20000  # the most train images it fits on (k-NN bank, linear heads), the same count per class
    per_class: int = 10  # the fewest fit images per class it aims for; below this only where max_share allows less
    test_images: int = 1000  # the seeded eval subset it tests on
    # of the run's compute all probes together may take, by a cost model (a training image 3 forwards of every
    # block, a probed one 1 of the encoder's) that a CPU measures a little low (5.3 probed images per training
    # image, not 6): 4 % keeps the measured share under 5 %; the fit subset shrinks to stay within it
    max_share: float = 0.04
    t: int = DEFAULT_T
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_steps: int = 500  # LARS steps of the quick linear heads on cached features: a second or so on a CPU
    linear_batch: int = 256
    linear_blrs: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])  # the best head is reported
    batch: int = 256  # feature extraction

    def validate(self) -> None:
        require("online_probe", "a positive integer", lambda v: v > 0, every=self.every, knn_k=self.knn_k,
                fit_images=self.fit_images, per_class=self.per_class, test_images=self.test_images,
                linear_steps=self.linear_steps, linear_batch=self.linear_batch, batch=self.batch)
        require("online_probe", ">= 0", lambda v: v >= 0, t=self.t)
        require("online_probe", "> 0", lambda v: v > 0, knn_temperature=self.knn_temperature)
        require("online_probe", "in (0, 1]", lambda v: 0 < v <= 1, max_share=self.max_share)
        if not self.linear_blrs or any(b <= 0 for b in self.linear_blrs):
            raise LdaeError(f"online_probe.linear_blrs: give positive base learning rates, got {self.linear_blrs}")
        for key in ("knn_k", "linear_batch"):  # both are cut to the fit subset, which holds at most fit_images
            if getattr(self, key) > self.fit_images:
                raise LdaeError(f"online_probe.{key} {getattr(self, key)} is more than online_probe.fit_images "
                                f"{self.fit_images}, the most images the probe fits on; lower it to {self.fit_images} "
                                "or less, or raise fit_images")


def probe_every(s: OnlineProbeConfig, total_steps: int) -> int:
    """Steps between online probes: `s.every`, or a quarter of the run (the last probe falls on the final step)."""
    return s.every or math.ceil(total_steps / 4)


def online_fit_per_class(s: OnlineProbeConfig, train_images: int, encoder_depth: int, decoder_depth: int,
                         total_steps: int, num_classes: int) -> int:
    """Fit images per class: as many as `s.fit_images` holds, fewer where the probes would take more than
    `s.max_share` of the run (at least one). The cost model: a training image costs a forward and a backward pass
    (3 forwards) of every block, a probed image one forward of the encoder's, and the run probes `probes` times
    the fit and test images; `train_images` is what the whole run trains on (steps x batch)."""
    probes = math.ceil(total_steps / probe_every(s, total_steps))
    affordable = s.max_share * train_images * 3 * (encoder_depth + decoder_depth) / encoder_depth / probes
    return max(1, min(s.fit_images, int(affordable) - s.test_images) // num_classes)


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
    data.cache says)."""
    s, plain = cfg.online_probe, replace(cfg.data, crop="center", hflip=False)
    test = build_dataset(replace(plain, limit=s.test_images), "eval", augment=False, seed=cfg.run.seed)
    train = build_dataset(replace(plain, cache="never"), "train", augment=False, seed=cfg.run.seed)
    if test.num_classes < 2 or train.num_classes < 2:
        raise LdaeError("it has no labelled images")
    total = plan_steps(len(train), cfg.optim, cfg.run.seed, ctx).total_steps
    _, encoder_depth, decoder_depth, _ = cfg.model.resolved()
    per_class = online_fit_per_class(s, total * cfg.optim.batch_size, encoder_depth, decoder_depth, total,
                                     train.num_classes)
    picked = balanced_subset(train.labels_tensor(), per_class, derived(cfg.run.seed, "online fit subset"))
    raw = [train.subset[i] for i in picked] if train.subset is not None else picked
    fit = ImageDataset(train.source, train.size, subset=raw)
    if cfg.data.cache != "never" and getattr(train.source, "stored_size", None) is None and \
            (cfg.data.cache == "always" or len(fit) * 3 * fit.size ** 2 <= 2 * 1024 ** 3):
        fit.materialize(cfg.data.num_workers, cfg.data.on_bad_image)
    return fit, test


def quick_linear(fit_f: torch.Tensor, fit_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, blrs: list[float], steps: int, batch: int, seed: int) -> float:
    """The probe's heads (BN + linear, LARS, one per blr) trained on cached features; the best head's top-1."""
    n = len(fit_f)
    batch = min(batch, n)
    per_epoch = max(1, n // batch)
    torch.manual_seed(seed)
    heads = ProbeHeads(fit_f.shape[1], num_classes, len(blrs)).to(fit_f.device)
    optimizer = lars_for_heads(heads, [b * batch / 256 for b in blrs])
    for step in range(steps):
        epoch, within = divmod(step, per_epoch)
        idx = epoch_order(n, seed, epoch)[within * batch:(within + 1) * batch].to(fit_f.device)
        set_lr(optimizer, lr_at(step, steps, max(1, steps // 10), 1.0))
        head_step(heads, optimizer, fit_f[idx], fit_y[idx])
    return float(evaluate(heads, test_f, test_y)[1].nan_to_num(0.0).max())


class OnlineProbe(Hook):
    """Every `every` steps and at the last one: features of the fit and test subsets from the weights being trained
    (the EMA when the run keeps one, as the offline probe reads), k-NN and linear top-1 into metrics.jsonl with the
    subset sizes, and on TensorBoard a chart of its own (Custom Scalars) titled with them."""

    def __init__(self, settings: OnlineProbeConfig, view: Callable[[Trainer], Pretrained], fit: ImageDataset,
                 test: ImageDataset, amp: torch.dtype | None, seed: int, num_workers: int):
        self.s, self.view, self.fit, self.test, self.amp, self.seed, self.num_workers = \
            settings, view, fit, test, amp, seed, num_workers
        self.per_class = max(fit.labels_tensor().bincount().tolist()) if len(fit) else 0
        self.seconds, self.count, self.charted = 0.0, 0, False

    @property
    def images(self) -> int:
        """Images one probe reads."""
        return len(self.fit) + len(self.test)

    def title(self) -> str:
        short = f", fewer than {self.s.per_class}/class to stay under {self.s.max_share:.0%} of the run" \
            if self.per_class < self.s.per_class else ""
        return (f"online probe top-1 % (fit {len(self.fit):,} train images, {self.per_class}/class{short}; "
                f"test {len(self.test):,} eval images)")

    def due(self, trainer: Trainer) -> bool:
        return trainer.step % probe_every(self.s, trainer.total_steps) == 0 or trainer.step == trainer.total_steps

    def after_step(self, trainer):
        if not self.due(trainer):
            return
        started, device = time.time(), trainer.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            knn, linear = self.measure(self.view(trainer), trainer.ctx)
        spent = time.time() - started
        self.seconds, self.count = self.seconds + spent, self.count + 1
        board = trainer.board.tb if trainer.board is not None else None
        if board is not None and not self.charted:
            board.add_custom_scalars({"online probe": {self.title(): ["Multiline", ["online_knn_top1",
                                                                                     "online_linear_top1"]]}})
            self.charted = True
        trainer.metrics.write({"step": trainer.step, "online_knn_top1": round(knn, 2),
                               "online_linear_top1": round(linear, 2), "online_probe_s": round(spent, 2),
                               "online_fit_images": len(self.fit), "online_fit_per_class": self.per_class,
                               "online_test_images": len(self.test)})

    def measure(self, pre: Pretrained, ctx: DistContext) -> tuple[float, float]:
        """(k-NN top-1, best linear top-1) of `pre`'s encoder: fitted on the fit subset, tested on the test one."""
        s = self.s
        encoder = encoder_features(pre, s.t, None, False, ctx.device, self.amp)
        reading = dict(batch=s.batch, seed=self.seed, num_workers=self.num_workers, progress=False)
        fit_f, fit_y = (x.to(ctx.device) for x in extract(encoder, self.fit, ctx, "online probe (fit)", **reading))
        test_f, test_y = (x.to(ctx.device) for x in extract(encoder, self.test, ctx, "online probe (test)", **reading))
        classes = self.test.num_classes
        knn = knn_accuracy(fit_f, fit_y, test_f, test_y, s.knn_k, s.knn_temperature, classes)
        linear = quick_linear(fit_f, fit_y, test_f, test_y, classes, s.linear_blrs, s.linear_steps, s.linear_batch,
                              self.seed)
        return knn, linear
