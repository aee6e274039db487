"""ViTDet Mask R-CNN training and COCO evaluation on the Trainer (the model and data are detectron2's, built
in detection.py): AdamW with layer-wise lr decay over the ViT blocks, ViTDet's warm-up + step schedule,
gradient accumulation, DDP, box and mask AP during and after training. The Trainer does checkpoints,
exact resume (a killed final evaluation is redone on resume), NaN guard and metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from functools import partial
from pathlib import Path

import torch
from rich.table import Table
from torch import nn

from ldae_cli.model import detection
from ldae_cli.runs.distributed import DistContext, amp_dtype, barrier, no_sync
from ldae_cli.runs.logs import console, progress_bar
from ldae_cli.runs.rundir import write_atomically
from ldae_cli.seeds import detect_step_seed
from ldae_cli.settings.evaluation import DetectConfig
from ldae_cli.settings.optim import StepPlan
from ldae_cli.train.hooks import Curve, Curves, Description, Evaluation, LogLine
from ldae_cli.train.session import Session
from ldae_cli.train.train_state import TrainState
from ldae_cli.train.trainer import Trainer

RESUMABLE = ("optim.micro_batch", "eval.every")


LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@contextlib.contextmanager
def quiet_detectron2():
    """detectron2 and the torch features it calls warn about their own internals on every step; what
    matters (AP, losses, an empty evaluation) this stage reports itself."""
    loggers = [logging.getLogger(name) for name in ("torch.fx._symbolic_trace", "detectron2")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for module in (r"detectron2\..*", r"torch\.functional", r"torch\.jit\..*", r"timm\..*", r"fvcore\..*"):
            warnings.filterwarnings("ignore", module=module)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def build_optimizer(model: nn.Module, optim, depth: int, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over detectron2's parameter groups: layer-wise lr decay over the ViT blocks, no weight decay
    on the ViT's LayerNorms and position embedding (ViTDet's settings). Each group's decayed lr is its
    `lr_scale`: the schedule's multiplier times it is the group's lr at every step."""
    from detectron2.modeling import get_vit_lr_decay_rate
    from detectron2.solver.build import get_default_optimizer_params

    groups = get_default_optimizer_params(
        model,
        base_lr=optim.lr,
        weight_decay_norm=0.0,
        overrides={"pos_embed": {"weight_decay": 0.0}},
        lr_factor_func=partial(get_vit_lr_decay_rate, lr_decay_rate=optim.layer_decay, num_layers=depth),
    )
    for group in groups:
        group["lr_scale"] = group["lr"]
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, fused=device.type == "cuda"
    )


def ap_table(results: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    for key in AP_KEYS:
        table.add_column(key, justify="right")
    for task in ("bbox", "segm"):
        row = results.get(task, {})
        table.add_row(
            "box" if task == "bbox" else "mask", *("-" if row.get(k) is None else f"{row[k]:.3f}" for k in AP_KEYS)
        )
    if all(v is None for row in results.values() for v in row.values()):
        table.caption = "no detection scored above 0.05, so COCOeval did not run (in effect AP 0)"
    return table


def flat_results(results: dict) -> dict:
    return {f"{task}_{k}": v for task, row in results.items() for k, v in row.items()}


def run_evaluation(model: nn.Module, split: detection.CocoSplit, cfg, text: Path, ctx: DistContext, bar=None) -> dict:
    """COCO AP on `split` (pycocotools' tables in `text`), shown as a task of `bar` (the training's) or of its own."""
    with (
        contextlib.nullcontext(bar)
        if bar is not None
        else progress_bar("img", cfg.run.progress and ctx.is_main) as shown
    ):
        task = shown.add_task(f"eval {cfg.data.eval_split}", total=-(-len(split.dicts) // ctx.world), info="")
        results = detection.evaluate(
            model,
            split,
            cfg.data.image_size,
            text,
            ctx.enabled,
            cfg.data.num_workers,
            advance=lambda n: shown.update(task, advance=n),
        )
        shown.remove_task(task)
    barrier(ctx)
    return results


def train(
    session: Session[DetectConfig],
    model: nn.Module,
    depth: int,
    train_split: detection.CocoSplit,
    eval_split: detection.CocoSplit,
    description: dict,
    parents: list[dict],
) -> bool:
    """Train the detector for optim.iterations, evaluating every eval.every iterations and at the end."""
    from detectron2.utils.events import EventStorage  # detectron2's losses log their statistics into one

    cfg, ctx, device = session.cfg, session.ctx, session.ctx.device
    optim, seed = cfg.optim, cfg.run.seed
    micro, accum = optim.accumulation(ctx.world)
    schedule = optim.lr_schedule()
    total = optim.iterations
    records = detection.train_dicts(train_split)
    plan = StepPlan(
        total,
        len(records) / optim.batch_size,
        optim.batch_size,
        lambda step: schedule(step / total),
        micro=micro,
        accum=accum,
    )
    optimizer = build_optimizer(model, optim, depth, device)
    autocast = amp_dtype(cfg.run.precision, device)

    def evaluate_now(step: int) -> dict:
        results = run_evaluation(model, eval_split, cfg, session.output("coco_eval.txt"), ctx, trainer.progress)
        model.train()
        if ctx.is_main:
            console.print(ap_table(results, f"COCO {cfg.data.eval_split} at step {step:,}"))
            trainer.metrics.write({"step": step, **flat_results(results)})
            record = json.dumps({"step": step, **results}, indent=1) + "\n"
            write_atomically(session.output("eval.json"), record.encode())
        return results

    every = cfg.eval.every or 0
    hooks = [
        LogLine(),
        Curves(Curve("loss.png", ("loss",), "detect loss")),
        Description(lambda: ({}, dict(description))),
        Evaluation(evaluate_now, every=lambda step: bool(every) and step % every == 0),
    ]
    trainer = Trainer(
        session,
        plan,
        TrainState({"model": model}, {"optim": optimizer}, parents=parents),
        hooks,
        losses=("loss",) + LOSSES,
        hint="Lower optim.lr or check the annotations",
    )
    runner = trainer.wrap(model)  # buffers (pixel statistics, anchors) are constants: not re-broadcast
    low, high = cfg.data.scale_range
    batches = iter(
        detection.train_loader(
            records,
            cfg.data.image_size,
            (low, high),
            seed,
            optim.batch_size,
            micro,
            ctx.rank,
            ctx.world,
            trainer.step,
            cfg.data.num_workers,
        )
    )

    def step(index: int) -> dict:
        # drop path and proposal sampling draw from torch's RNG: keyed by (seed, step, rank) for exact resume
        torch.manual_seed(detect_step_seed(seed, index, ctx.rank, ctx.world))
        with EventStorage(index):
            for k in range(accum):
                sync = no_sync(runner, ctx.enabled and k < accum - 1)
                with sync:
                    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                        loss_dict = runner(next(batches))
                    loss = sum(loss_dict.values())
                    (loss / accum).backward()
                terms = torch.stack([loss] + [loss_dict[name] for name in LOSSES]).detach().double()
                trainer.meter.add_all(terms / accum, 1 / accum)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"lr": optim.lr * schedule(index / total)}

    spec = description["backbone"]
    trainer.announce(
        f"{len(records):,} training images, {len(train_split.class_names)} classes, "
        f"{cfg.data.image_size}px LSJ; ViT {spec['width']}x{spec['depth']} (patch {spec['patch_size']}, "
        f"global blocks {detection.global_block_indexes(spec['depth'])}, window "
        f"{cfg.backbone.window_size})",
        optim.lr,
    )
    model.train()
    return trainer.fit(step)
