"""Linear probing on the engine (MAE protocol), several learning rates at once.

Features -> BatchNorm without affine -> one Linear head per learning rate. The BN has no
parameters and each head's loss depends only on its own weights, so K heads trained together on
the sum of their losses are exactly K separate runs over the same feature batches: the lr sweep
costs one pass over the data instead of K.

LARS as MAE uses it (timm's `Lars`): momentum 0.9, the trust-ratio adaptation on weight matrices
only, no weight decay; biases get plain momentum SGD.

Two modes, both on the Trainer (checkpoints, exact resume, NaN guard when every head diverged):
- full (the paper's protocol): random-resized crop + flip every epoch, features recomputed each
  step from this rank's share of the global batch and gathered, heads trained by LARS;
- fast (small data): features of center crops extracted once, heads trained on the cached
  features, plus weighted k-NN accuracy from the same features.
The final evaluation (eval-split features, every head's top-1/top-5) is the run's `Evaluation`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn

from ldae_cli.config import require
from ldae_cli.data import BadImageCounter, ImageDataset, StepBatches, build_dataset, epoch_order, make_loader
from ldae_cli.distributed import DistContext, all_gather_cat
from ldae_cli.engine import Curve, Trainer
from ldae_cli.errors import LdaeError
from ldae_cli.optim import StepPlan, lr_at, plan_steps, set_lr
from ldae_cli.pretrained import DEFAULT_T, FeatureEncoder, Pretrained, encoder_features
from ldae_cli.reporting import progress_bar
from ldae_cli.runs import Session
from ldae_cli.train_state import Evaluation, Hook


class ProbeHeads(nn.Module):
    def __init__(self, dim: int, num_classes: int, count: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(count))
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W) -> logits (K, B, C)."""
        x = self.bn(features)
        return torch.stack([head(x) for head in self.heads])


def lars_for_heads(heads: ProbeHeads, lrs: list[float], momentum: float = 0.9, weight_decay: float = 0.0) -> Lars:
    """One parameter group per (head, weight|bias); each carries its own lr as `lr_scale`.

    Weight matrices get LARS adaptation (always_adapt: the trust ratio applies even at wd 0, as in
    MAE); 1-D parameters neither adaptation nor weight decay.
    """
    groups = []
    for head, lr in zip(heads.heads, lrs):
        groups.append({"params": [head.weight], "lr_scale": lr, "always_adapt": True, "weight_decay": weight_decay})
        groups.append({"params": [head.bias], "lr_scale": lr, "always_adapt": False, "weight_decay": 0.0})
    return Lars(groups, lr=0.0, momentum=momentum)


def head_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each head's mean cross-entropy, (K,); their sum trains every head on its own loss alone."""
    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), labels.repeat(k), reduction="none").view(k, b).mean(1)


def loss_terms(blrs: list[float]) -> tuple[str, ...]:
    """metrics.jsonl names: `loss` is the lowest head's loss (a head at too high an lr may diverge while the
    others are fine), then one `loss_blr<blr>` per head."""
    return ("loss",) + tuple(f"loss_blr{blr:g}" for blr in blrs)


def with_lowest(losses: torch.Tensor) -> torch.Tensor:
    """(K,) head losses -> (1 + K,): the best head's loss first (non-finite only when every head has diverged),
    then the heads, in the order of `loss_terms`."""
    lowest = torch.where(losses.isnan(), math.inf, losses).min()
    return torch.cat([lowest[None], losses])


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """logits (K, N, C) -> {k: per-head accuracy (K,)} in percent; k is capped at the class count."""
    c = logits.shape[-1]
    top = logits.topk(min(max(ks), c), dim=-1).indices  # (K, N, kmax)
    hit = top == labels[None, :, None]
    return {k: 100.0 * hit[..., : min(k, c)].any(-1).float().mean(-1) for k in ks}


def head_step(heads: ProbeHeads, optimizer: Lars, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One LARS step on a feature batch at the optimizer's current lrs; returns each head's loss, (K,), detached."""
    heads.train()
    losses = head_losses(heads(features), labels)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


@torch.no_grad()
def evaluate(heads: ProbeHeads, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096
             ) -> dict[int, torch.Tensor]:
    heads.eval()
    logits = torch.cat([heads(features[i:i + batch]) for i in range(0, len(features), batch)], dim=1)
    return topk_accuracy(logits, labels)


@torch.no_grad()
def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted k-NN on cosine similarity (votes exp(sim / T), as in DINO's evaluation), top-1 percent."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train.float(), dim=1)
    correct = 0
    k = min(k, len(train))
    for i in range(0, len(test), chunk):
        sims = F.normalize(test[i:i + chunk].float(), dim=1) @ train.T
        top_sim, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return 100.0 * correct / max(1, len(test))


def steps_for(n: int, batch: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * (n // batch if n >= batch else 1)))


@torch.no_grad()
@torch.no_grad()
def extract(encoder: FeatureEncoder, dataset: ImageDataset, ctx: DistContext, label: str, batch: int = 256,
            seed: int = 0, num_workers: int = 0, on_bad_image: str = "error", progress: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image (center crops), each rank a contiguous shard, gathered on all ranks."""
    device = ctx.device
    n = len(dataset)
    lo, hi = n * ctx.rank // ctx.world, n * (ctx.rank + 1) // ctx.world
    batches = [list(range(i, min(i + batch, hi))) for i in range(lo, hi, batch)]
    bad = BadImageCounter(on_bad_image)
    feats, labels = [], []
    with progress_bar("img", progress and ctx.is_main) as bar:
        task = bar.add_task(f"features ({label})", total=hi - lo, info="")
        for keys, items in zip(batches, make_loader(dataset, batches, num_workers, pin_memory=device.type == "cuda")):
            items = bad.check(items)
            feats.append(encoder.fn(items.images.to(device, non_blocking=True), seed * 7919 + keys[0]).cpu())
            labels.append(items.labels)
            bar.update(task, advance=len(keys))
    return all_gather_cat(torch.cat(feats), ctx), all_gather_cat(torch.cat(labels), ctx)


def reading(cfg) -> dict:
    """`extract`'s settings from a probe config."""
    return dict(batch=cfg.probe.extract_batch, seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                on_bad_image=cfg.data.on_bad_image, progress=cfg.run.progress)


class StepPieces:
    """A batch sampler: each step's keys of this rank cut into encoder-sized pieces of `size` images."""

    def __init__(self, batches: StepBatches, per_rank: int, size: int):
        self.batches = batches
        self.pieces = [list(range(i, min(i + size, per_rank))) for i in range(0, per_rank, size)]

    def __iter__(self):
        for keys in self.batches:
            for piece in self.pieces:
                yield [keys[i] for i in piece]


def head_plan(s, n: int, seed: int, ctx: DistContext) -> StepPlan:
    """Steps of a probe over n training images (fast mode: n cached features, whose global batch is capped at n);
    the lr of step i is lr_at(i) x each head's own lr."""
    if s.fast:
        batch, batches = min(s.batch_size, n), None
        per_epoch = max(1, n // batch)
        total = steps_for(n, batch, s.epochs)
    else:
        batch, batches = s.batch_size, StepBatches(n, s.batch_size, seed, ctx.rank, ctx.world,
                                                     key="probe.batch_size")
        per_epoch = batches.steps_per_epoch
        total = max(1, round(s.epochs * per_epoch))
    lr = partial(lr_at, total_steps=total, warmup_steps=round(s.warmup_epochs * per_epoch), base_lr=1.0)
    return StepPlan(total, per_epoch, batch, lr, batches)


def every_head_diverged(heads: ProbeHeads) -> str | None:
    """The probe's NaN guard at a save: one head at too high an lr may diverge while the others learn."""
    finite = [all(bool(torch.isfinite(p).all()) for p in head.parameters()) for head in heads.heads]
    return None if any(finite) else "every probe head"


def results_rows(blrs: list[float], lrs: list[float], last_losses: list[float | None], acc: dict) -> list[dict]:
    return [{"blr": b, "lr": lr, "train_loss": loss, "top1": round(float(acc[1][i]), 2),
             "top5": round(float(acc[5][i]), 2)} for i, (b, lr, loss) in enumerate(zip(blrs, lrs, last_losses))]


def train(session: Session, encoder: FeatureEncoder, train_set: ImageDataset, eval_set: ImageDataset,
          about: dict, show: Callable[[list[dict], float | None], None]) -> dict:
    """Train the heads on `encoder`'s features and evaluate them; returns the results ({} when stopped early).
    `about` describes the run for results.json; `show(rows, knn)` prints the table on the main rank."""
    cfg, ctx, device = session.cfg, session.ctx, session.ctx.device
    s, seed = cfg.probe, cfg.run.seed
    started = time.time()
    num_classes = train_set.num_classes
    train_f = train_y = None
    if s.fast:
        train_f, train_y = extract(encoder, train_set, ctx, "train", **reading(cfg))
        plan = head_plan(s, len(train_f), seed, ctx)
        train_f, train_y = train_f.to(device), train_y.to(device)
    else:
        plan = head_plan(s, len(train_set), seed, ctx)
    batch, per_epoch = plan.batch_size, plan.steps_per_epoch
    lrs = [blr * batch / 256 for blr in s.blrs]
    torch.manual_seed(seed)
    heads = ProbeHeads(encoder.dim, num_classes, len(s.blrs)).to(device)
    optimizer = lars_for_heads(heads, lrs, s.momentum, s.weight_decay)
    stored = session.resume.extra.get("last_losses") if session.resume is not None else None
    # each head's loss at the latest step (kept on the device: a step never waits for it); nan: none yet
    last = [torch.tensor([math.nan if x is None else x for x in stored or [None] * len(s.blrs)])]

    def last_losses() -> list[float | None]:  # null: the head diverged (or has not stepped)
        return [float(x) if x.isfinite() else None for x in last[0].cpu()]

    def describe() -> tuple[dict, dict]:
        return {}, {"blrs": s.blrs, "lrs": lrs, "encoder": encoder.description, "class_names": train_set.classes,
                    "last_losses": last_losses(), **about}

    def final_evaluation(step: int) -> dict:
        eval_f, eval_y = extract(encoder, eval_set, ctx, "eval", **reading(cfg))
        acc = evaluate(heads, eval_f.to(device), eval_y.to(device))
        knn = knn_accuracy(train_f, train_y, eval_f.to(device), eval_y.to(device), s.knn_k, s.knn_temperature,
                           num_classes) if s.fast else None
        rows = results_rows(s.blrs, lrs, last_losses(), acc)
        best = max(range(len(rows)), key=lambda i: rows[i]["top1"])
        results = {"encoder": encoder.description, "heads": rows, "best_head": best, "best_top1": rows[best]["top1"],
                   "knn_top1": None if knn is None else round(knn, 2), **about, "fast": s.fast,
                   "eval_split": cfg.data.split_name("eval"), "seconds": round(time.time() - started, 1)}
        if ctx.is_main:
            (session.out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
            show(rows, knn)
        return results

    evaluation = Evaluation(final_evaluation)
    terms = loss_terms(s.blrs)
    trainer = Trainer(session, plan, {"heads": heads}, {"optim": optimizer}, describe=describe,
                      parents=encoder.parents, losses=terms, shown=("loss",), non_finite=lambda: every_head_diverged(heads),
                      hint=f"Every probe head diverged: lower probe.blrs (now {s.blrs})",
                      curves=(Curve("loss.png", terms, "probe head losses"),), hooks=(evaluation,))

    def record(losses: torch.Tensor) -> None:
        trainer.meter.add_all(with_lowest(losses))
        last[0] = losses

    def fast_step(index: int) -> None:
        epoch, within = divmod(index, per_epoch)
        idx = epoch_order(len(train_f), seed, epoch)[within * batch:(within + 1) * batch].to(device)
        record(head_step(heads, optimizer, train_f[idx], train_y[idx]))

    if not s.fast:
        pieces = StepPieces(plan.batches, batch // ctx.world, s.extract_batch)
        stream = trainer.stream(train_set, cfg.data, sampler=pieces)

    def full_step(index: int) -> None:
        feats, labels = [], []
        for k in range(len(pieces.pieces)):
            b = stream.next()
            feats.append(encoder.fn(b.images.to(device, non_blocking=True), seed * 7919 + index * 131 + k))
            labels.append(b.labels.to(device))
        record(head_step(heads, optimizer, all_gather_cat(torch.cat(feats), ctx), all_gather_cat(torch.cat(labels), ctx)))

    if not trainer.fit(fast_step if s.fast else full_step):
        return {}
    return {k: v for k, v in evaluation.latest.items() if k != "step"}


# ---------------------------------------------------------------------------------------------
# The online probe: is the pretraining run learning?
# ---------------------------------------------------------------------------------------------

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
        require("online_probe", "in (0, 1]", lambda v: 0 < v <= 1, max_share=self.max_share)
        if not self.linear_blrs or any(b <= 0 for b in self.linear_blrs):
            raise LdaeError(f"online_probe.linear_blrs: give positive base learning rates, got {self.linear_blrs}")


def online_fit_per_class(s: OnlineProbeConfig, train_images: int, encoder_depth: int, decoder_depth: int,
                         total_steps: int, num_classes: int) -> int:
    """Fit images per class: as many as `s.fit_images` holds, fewer where the probes would take more than
    `s.max_share` of the run (at least one). The cost model: a training image costs a forward and a backward pass
    (3 forwards) of every block, a probed image one forward of the encoder's, and the run probes `probes` times
    the fit and test images; `train_images` is what the whole run trains on (steps x batch)."""
    every = s.every or math.ceil(total_steps / 4)
    probes = math.ceil(total_steps / every)
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
    picked = balanced_subset(train.labels_tensor(), per_class, cfg.run.seed + 2)
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

    def __init__(self, settings: OnlineProbeConfig, view: Callable[["Trainer"], Pretrained], fit: ImageDataset,
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

    def due(self, trainer: "Trainer") -> bool:
        every = self.s.every or math.ceil(trainer.total_steps / 4)
        return trainer.step % every == 0 or trainer.step == trainer.total_steps

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
        """(k-NN top-1, best linear head's top-1) of `pre`'s encoder: fitted on the fit subset, tested on the test one."""
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
