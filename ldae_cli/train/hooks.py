"""The concrete hooks of a run (the base class, `Hook`, lives with the Trainer): what a run does besides its
steps, at the points detectron2's hooks use. A stage's engine picks the ones it needs:

- `LogLine`: the progress bar's losses and, off a terminal, one plain line per metrics line;
- `Curves`: loss and accuracy curves drawn from metrics.jsonl as PNG at every checkpoint;
- `Pictures`: images on the dashboard (TensorBoard, W&B) at every checkpoint (the pretrain denoise panel);
- `Description`: the stage's own tensors and metadata in every checkpoint (its network spec, tokenizer, ...);
- `Evaluation`: an evaluation every few steps and after the last one, resumable; `online_probe.OnlineProbe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldae_cli.data.plots import save_curves
from ldae_cli.runs.logs import PlainProgress, clock, console, read_metrics
from ldae_cli.train.trainer import Hook, Trainer


class LogLine(Hook):
    """The losses `shown` in the progress bar and, when output goes to a file, one plain line per metrics line:
    step/total, epoch, every logged term, img/s, data wait and ETA."""

    def __init__(self, shown: tuple[str, ...] = ("loss", "lr")):
        self.shown = shown

    def after_log(self, trainer, record: dict) -> None:
        bar, task = trainer.progress, trainer.bar_task
        if bar is None:
            return
        shown = " ".join(f"{k} {record[k]:.3g}" for k in self.shown if isinstance(record.get(k), float))
        bar.update(task, info=f"{shown} ep {trainer.epoch:.2f}")
        if isinstance(bar, PlainProgress):  # off a terminal (nohup, a scheduler)
            console.print(self.line(trainer, record), highlight=False)

    @staticmethod
    def line(trainer, r: dict) -> str:
        terms = "  ".join(
            f"{k} {v:.4g}"
            for k, v in r.items()
            if isinstance(v, float) and k not in ("epoch", "img_per_s", "time_s", "data_wait")
        )
        rate = trainer.rate if trainer.rate == trainer.rate and trainer.rate > 0 else None
        eta = clock((trainer.total_steps - trainer.step) * trainer.plan.batch_size / rate) if rate else "?"
        wait = f"  data wait {100 * r['data_wait']:.0f}%" if r.get("data_wait") is not None else ""
        speed = f"{rate:,.0f} img/s" if rate else "-- img/s"
        return (
            f"{trainer.session.command} step {trainer.step:,}/{trainer.total_steps:,} ep {trainer.epoch:.2f}  "
            f"{terms}  {speed}{wait}  eta {eta}"
        )


@dataclass
class Curve:
    """A PNG drawn from metrics.jsonl at every checkpoint."""

    file: str
    keys: tuple[str, ...]
    title: str
    x: str = "step"
    log_y: bool = True


class Curves(Hook):
    """`curves` redrawn from metrics.jsonl after every checkpoint (main rank)."""

    def __init__(self, *curves: Curve):
        self.curves = curves

    def after_save(self, trainer) -> None:
        records = read_metrics(trainer.metrics.path)
        for curve in self.curves:
            save_curves(
                records,
                trainer.session.output(curve.file),
                curve.keys,
                x=curve.x,
                title=f"{curve.title} ({trainer.path.parent.name})",
                log_y=curve.log_y,
            )


class Pictures(Hook):
    """`draw(trainer)` -> {tag: uint8 (3, H, W) image} on the dashboard after every checkpoint (main rank)."""

    def __init__(self, draw: Callable[[Trainer], dict[str, torch.Tensor]]):
        self.draw = draw

    def after_save(self, trainer) -> None:
        if trainer.board is not None:
            for tag, image in self.draw(trainer).items():
                trainer.board.image(tag, image, trainer.step)


class Description(Hook):
    """The stage's own content of every checkpoint: `describe()` -> (tensors, extra), e.g. a pretrain run's model
    spec and tokenizer, a fine-tuning run's best accuracy so far."""

    def __init__(self, describe: Callable[[], tuple[dict[str, torch.Tensor], dict]]):
        self.describe = describe

    def checkpoint(self, trainer) -> tuple[dict[str, torch.Tensor], dict]:
        return self.describe()


class Evaluation(Hook):
    """`evaluate(step)` at the steps `every(step)` names and after the last step, then the line `summary()` gives
    (None: none). The latest result is part of the train state (extra['eval']), so a run killed after its last step
    but before the final evaluation finishes that evaluation on resume, and never trains again."""

    owns = ("eval",)

    def __init__(
        self,
        evaluate: Callable[[int], dict],
        every: Callable[[int], bool] = lambda step: False,
        summary: Callable[[], str | None] = lambda: None,
    ):
        self.evaluate, self.every, self.summary = evaluate, every, summary
        self.eval: dict | None = None  # the latest result

    def run(self, step: int) -> None:
        self.eval = {"step": step, **self.evaluate(step)}

    def wants_save(self, trainer):
        return self.every(trainer.step)

    def after_step(self, trainer):
        if self.every(trainer.step) and trainer.step < trainer.total_steps:
            self.run(trainer.step)

    def after_last_save(self, trainer):
        if self.eval is not None and self.eval.get("step") == trainer.total_steps:
            return False  # done before the run stopped
        self.run(trainer.total_steps)
        return True

    def after_train(self, trainer):
        if trainer.ctx.is_main and trainer.step >= trainer.total_steps and (line := self.summary()):
            console.print(line)
