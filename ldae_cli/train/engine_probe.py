"""Linear probing on the Trainer (MAE protocol), several learning rates at once (the heads: heads.py).

Two modes, both on the Trainer (checkpoints, exact resume, NaN guard when every head diverged):
- full (the paper's protocol): random-resized crop + flip every epoch, features recomputed each
  step from this rank's share of the global batch and gathered, heads trained by LARS;
- fast (small data): features of center crops extracted once, heads trained on the cached
  features, plus weighted k-NN accuracy from the same features.
The final evaluation (eval-split features, every head's top-1/top-5) is the run's `Evaluation`. The head it
reports is chosen by `probe.select`: `holdout` (the default) on a seeded 10 % of the train split kept from the heads,
its eval top-1 reported beside the best-on-eval one; `eval` on the eval split itself (optimistic).
"""

from __future__ import annotations

import copy
import json
import math
import time
from functools import partial
from typing import Callable

import torch

from ldae_cli.data.pipeline import ImageDataset
from ldae_cli.errors import LdaeError
from ldae_cli.model.pretrained import FeatureEncoder
from ldae_cli.runs.distributed import DistContext, all_gather_cat
from ldae_cli.runs.rundir import write_atomically
from ldae_cli.seeds import SeededSteps, derived, epoch_order, step_feature_seed
from ldae_cli.settings.evaluation import ProbeConfig
from ldae_cli.settings.optim import StepPlan, lr_at
from ldae_cli.train.heads import (
    ProbeHeads,
    evaluate,
    extract,
    head_step,
    knn_accuracy,
    lars_for_heads,
    loss_terms,
    steps_for,
    with_lowest,
)
from ldae_cli.train.hooks import Curve, Curves, Description, Evaluation, LogLine
from ldae_cli.train.session import Session
from ldae_cli.train.train_state import TrainState
from ldae_cli.train.trainer import Trainer

RESUMABLE = ("probe.extract_batch",)
HOLDOUT = 0.1  # the share of the train split that `probe.select: holdout` keeps from the heads to choose one


def reading(cfg) -> dict:
    """`extract`'s settings from a probe config."""
    return dict(
        batch=cfg.probe.extract_batch,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        on_bad_image=cfg.data.on_bad_image,
        progress=cfg.run.progress,
    )


def head_plan(s, n: int, seed: int, ctx: DistContext) -> StepPlan:
    """Steps of a probe over n training images (fast mode: n cached features, whose global batch is capped at n);
    the lr of step i is lr_at(i) x each head's own lr."""
    if s.fast:
        batch, batches = min(s.batch_size, n), None
        per_epoch = max(1, n // batch)
        total = steps_for(n, batch, s.epochs)
    else:
        # each step's share of this rank in encoder-sized pieces
        batch, batches = (
            s.batch_size,
            SeededSteps(n, s.batch_size, seed, ctx.rank, ctx.world, key="probe.batch_size", piece=s.extract_batch),
        )
        per_epoch = batches.steps_per_epoch
        total = max(1, round(s.epochs * per_epoch))
    lr = partial(lr_at, total_steps=total, warmup_steps=round(s.warmup * per_epoch), base_lr=1.0)
    return StepPlan(total, per_epoch, batch, lr, batches)


def holdout_split(ds: ImageDataset, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(the images the heads train on, the held-out ones that choose the head: center crops): a seeded HOLDOUT share
    of each class, at least one image of a class that has two or more."""
    labels = ds.labels_tensor()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(derived(seed, "probe holdout")))
    by_class, position = torch.sort(labels[order], stable=True)  # each class's images in the seeded order
    rank = torch.arange(len(labels)) - torch.searchsorted(by_class, by_class)
    size = by_class.bincount()[by_class]  # the size of each image's class
    held = rank < torch.minimum((size * HOLDOUT).round().clamp_min(1), size - 1)
    if not held.any():
        raise LdaeError(
            "probe.select holdout keeps a tenth of each class's training images to choose the head, but no "
            "class has two; give more training images or set probe.select=eval"
        )
    train, kept = (part(ds, sorted(order[position[mask]].tolist())) for mask in (~held, held))
    kept.crop, kept.hflip = "center", False
    return train, kept


def held_out(images: int) -> int:
    """About how many training images `select: holdout` keeps from the heads (the plan's count)."""
    return max(1, round(HOLDOUT * images))


def part(ds: ImageDataset, indices: list[int]) -> ImageDataset:
    """The items `indices` of `ds` as a dataset of their own (its decoded cache, when it has one, cut alike)."""
    piece = copy.copy(ds)
    piece.subset = [ds.subset[i] for i in indices] if ds.subset is not None else indices
    piece.cached = ds.cached[indices] if ds.cached is not None else None
    return piece


def selection(rows: list[dict], select: str, best: int) -> int:
    """The reported head: the best on the eval split (select eval), else the best on the holdout among the heads
    that did not diverge (the first of equals)."""
    if select == "eval":
        return best
    return max(range(len(rows)), key=lambda i: (rows[i]["train_loss"] is not None, rows[i]["holdout_top1"], -i))


def summary(results: dict) -> str:
    """The probe's one line: the reported top-1 and how its head was chosen, the best-on-eval beside it."""
    rows, chosen, best = results["heads"], results["selected_head"], results["best_head"]
    split = results["eval_split"]
    if results["select"] == "eval":
        return (
            f"top-1 {results['selected_top1']:.2f} % on {split}: head {best} (blr {rows[best]['blr']:g}), "
            f"chosen on the {split} split itself (probe.select eval: optimistic)"
        )
    return (
        f"top-1 {results['selected_top1']:.2f} % on {split}: head {chosen} (blr {rows[chosen]['blr']:g}), "
        f"chosen on {results['holdout_images']:,} held-out train images (probe.select holdout); best on "
        f"{split} itself {results['best_top1']:.2f} % (head {best}, optimistic)"
    )


def every_head_diverged(heads: ProbeHeads) -> str | None:
    """The probe's NaN guard at a save: one head at too high an lr may diverge while the others learn."""
    finite = [all(bool(torch.isfinite(p).all()) for p in head.parameters()) for head in heads.heads]
    return None if any(finite) else "every probe head"


def results_rows(blrs: list[float], lrs: list[float], last_losses: list[float | None], acc: dict) -> list[dict]:
    return [
        {"blr": b, "lr": lr, "train_loss": loss, "top1": round(float(acc[1][i]), 2), "top5": round(float(acc[5][i]), 2)}
        for i, (b, lr, loss) in enumerate(zip(blrs, lrs, last_losses))
    ]


def top1_record(step: int, results: dict) -> dict:
    """The probe's metrics line after its evaluation (so TensorBoard and W&B show the top-1 beside the losses)."""
    knn = {} if results["knn_top1"] is None else {"probe_knn_top1": results["knn_top1"]}
    return {
        "step": step,
        "probe_best_top1": results["best_top1"],
        "probe_selected_top1": results["selected_top1"],
        **knn,
    }


def add_holdout_top1(rows: list[dict], accuracy) -> None:
    """Each head's top-1 on the held-out training images (`evaluate`'s result on them), beside its eval top-1."""
    for row, top1 in zip(rows, accuracy[1]):
        row["holdout_top1"] = round(float(top1), 2)


def chosen_head(rows: list[dict], select: str) -> dict:
    """The heads' rows, the head `select` chooses (holdout: on held-out training images) and the best on eval."""
    best = max(range(len(rows)), key=lambda i: rows[i]["top1"])
    chosen = selection(rows, select, best)
    return {
        "heads": rows,
        "select": select,
        "selected_head": chosen,
        "selected_top1": rows[chosen]["top1"],
        "best_head": best,
        "best_top1": rows[best]["top1"],
    }


def train(
    session: Session[ProbeConfig],
    encoder: FeatureEncoder,
    train_set: ImageDataset,
    eval_set: ImageDataset,
    about: dict,
    show: Callable[[dict], None],
) -> dict:
    """Train the heads on `encoder`'s features and evaluate them; returns the results ({} when stopped early).
    `about` describes the run for results.json; `show(results)` prints them on the main rank."""
    cfg, ctx, device = session.cfg, session.ctx, session.ctx.device
    s, seed = cfg.probe, cfg.run.seed
    started = time.time()
    train_set, holdout = holdout_split(train_set, seed) if s.select == "holdout" else (train_set, None)
    num_classes = train_set.num_classes
    train_f, train_y = (
        (t.to(device) for t in extract(encoder, train_set, ctx, "train", **reading(cfg))) if s.fast else (None, None)
    )
    plan = head_plan(s, len(train_set) if train_f is None else len(train_f), seed, ctx)
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
        return {}, {
            "blrs": s.blrs,
            "lrs": lrs,
            "encoder": encoder.description,
            "class_names": train_set.classes,
            "last_losses": last_losses(),
            **about,
        }

    def final_evaluation(step: int) -> dict:
        eval_f, eval_y = extract(encoder, eval_set, ctx, "eval", **reading(cfg))
        acc = evaluate(heads, eval_f.to(device), eval_y.to(device))
        knn = (
            knn_accuracy(
                train_f, train_y, eval_f.to(device), eval_y.to(device), s.knn_k, s.knn_temperature, num_classes
            )
            if train_f is not None and train_y is not None
            else None
        )  # fast mode
        rows = results_rows(s.blrs, lrs, last_losses(), acc)
        if holdout is not None:
            held_f, held_y = extract(encoder, holdout, ctx, "holdout", **reading(cfg))
            add_holdout_top1(rows, evaluate(heads, held_f.to(device), held_y.to(device)))
        results = {
            "encoder": encoder.description,
            **chosen_head(rows, s.select),
            "holdout_images": 0 if holdout is None else len(holdout),
            "knn_top1": None if knn is None else round(knn, 2),
            **about,
            "fast": s.fast,
            "eval_split": cfg.data.split_name("eval"),
            "seconds": round(time.time() - started, 1),
        }
        if ctx.is_main:
            write_atomically(session.output("results.json"), (json.dumps(results, indent=1) + "\n").encode())
            show(results)
        trainer.metrics.write(top1_record(step, results))
        return results

    evaluation = Evaluation(final_evaluation)
    terms = loss_terms(s.blrs)
    state = TrainState(
        {"heads": heads}, {"optim": optimizer}, parents=encoder.parents, non_finite=lambda: every_head_diverged(heads)
    )
    trainer = Trainer(
        session,
        plan,
        state,
        [LogLine(("loss",)), Curves(Curve("loss.png", terms, "probe head losses")), Description(describe), evaluation],
        losses=terms,
        hint=f"Every probe head diverged: lower probe.blrs (now {s.blrs})",
    )

    def record(losses: torch.Tensor) -> None:
        trainer.meter.add_all(with_lowest(losses))
        last[0] = losses

    def fast_step(index: int) -> None:
        assert train_f is not None and train_y is not None and isinstance(per_epoch, int)  # fast mode's cache
        epoch, within = divmod(index, per_epoch)
        idx = epoch_order(len(train_f), seed, epoch)[within * batch : (within + 1) * batch].to(device)
        record(head_step(heads, optimizer, train_f[idx], train_y[idx]))

    if not s.fast:
        stream = trainer.stream(train_set, cfg.data)
        assert plan.batches is not None  # full mode: seeded steps
        pieces = len(plan.batches.micro_batches(0))

    def full_step(index: int) -> None:
        feats, labels = [], []
        for k in range(pieces):
            b = stream.next()
            feats.append(encoder.fn(b.images.to(device, non_blocking=True), step_feature_seed(seed, index, k)))
            labels.append(b.labels.to(device))
        record(
            head_step(heads, optimizer, all_gather_cat(torch.cat(feats), ctx), all_gather_cat(torch.cat(labels), ctx))
        )

    finished = trainer.fit(fast_step if s.fast else full_step)  # not stopped early: its last step evaluated
    return {k: v for k, v in evaluation.eval.items() if k != "step"} if finished and evaluation.eval is not None else {}
