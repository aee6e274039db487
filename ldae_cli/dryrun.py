"""`--dry-run` and `--print-config`: what a training command would do, checked and planned, before any work.

A dry run reads the config, settles the data (kind, splits, size: file listings, no image decoded), checks the
output folder the way a start would (without writing), plans the steps and the batch split, counts the network's
parameters and the memory its weights, gradients, optimizer state and EMA take, and times a few steps of the
network on a small synthetic batch on the chosen device to estimate the run's time. Nothing is written.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from rich.table import Table

from ldae_cli import rundir
from ldae_cli.checkpoint import Checkpoint
from ldae_cli.config import dump_yaml
from ldae_cli.discovery import check_splits
from ldae_cli.logs import clock, console
from ldae_cli.optim import StepPlan, plan_steps
from ldae_cli.session import kept_config
from ldae_cli.sources import open_source


def print_config(cfg) -> None:
    """The resolved config as YAML on stdout (plain text, so it can be saved and passed back with --config)."""
    sys.stdout.write(dump_yaml(cfg))


def world_size() -> int:
    """The ranks a torchrun launch of this command would have (1 for a plain command)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Plan:
    command: str
    out_dir: Path
    start: str  # what happens in out_dir: a new run, the same run started again, a continued one, ...
    images: int  # training images
    batch: int  # global batch
    ranks: int
    accum: int
    micro: int
    steps: int
    steps_per_epoch: float
    lr: float
    params: int
    state_bytes: int  # weights, gradients, optimizer state and EMA (activations come on top)
    seconds_per_image: float | None = None  # one rank, measured on a small synthetic batch
    timing: str = ""  # how the time was measured, or why it was not
    notes: list[str] = field(default_factory=list)
    work_images: int | None = None  # images the timed work runs on over the run (default: steps x batch)

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def show(self) -> None:
        table = Table(title=f"ldae {self.command} --dry-run (nothing was written)", show_header=False)
        table.add_column(justify="right", style="bold")
        table.add_column()
        rows = [("run directory", f"{self.out_dir}: {self.start}"),
                ("data", f"{self.images:,} training images"),
                ("plan", f"{self.steps:,} steps = {self.epochs:g} epoch{'' if self.epochs == 1 else 's'} of "
                         f"{self.steps_per_epoch:g} steps"),
                ("batch", f"{self.batch:,} global = {self.ranks} rank(s) x {self.accum} accumulation x {self.micro}"),
                ("peak lr", f"{self.lr:.3g}"),
                ("network", f"{self.params / 1e6:,.2f}M parameters"),
                ("memory", f"{size(self.state_bytes)} for weights, gradients, optimizer state and EMA "
                           "(activations on top)")]
        if self.seconds_per_image is not None:
            total = self.seconds_per_image * (self.work_images or self.steps * self.batch) / self.ranks
            rows.append(("time", f"about {clock(total)} ({1 / self.seconds_per_image:,.1f} img/s per rank; "
                                 f"{self.timing})"))
        else:
            rows.append(("time", self.timing))
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
        for note in self.notes:
            console.print(note)


def size(nbytes: int) -> str:
    return f"{nbytes / 2 ** 30:,.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:,.1f} MiB"


def start_of(out_dir: Path, command: str, kind: str, force: bool, resume_step: int | None = None,
             keep: set[str] = frozenset(), restartable=None) -> str:
    """What a start would do in `out_dir`, decided as `rundir.claim` decides, without writing; refusals raise."""
    if resume_step is not None:
        return f"continues the run at step {resume_step:,}"
    if not out_dir.exists():
        return "a new run (the folder is created)"
    if not out_dir.is_dir():
        rundir.resolve(command, kind, str(out_dir), None, None)  # raises: a file, not a run directory
    action, ours = rundir.decide(out_dir, command, force, keep, restartable, kind=kind)
    return {"empty": "a new run in the empty folder",
            "restart": "the same run, stopped before its first checkpoint, started again",
            "replace": f"replaces the earlier run ({len(ours)} file(s) ldae wrote there)"}[action]


@dataclass
class Outline:
    """What every training stage's --dry-run settles before its own part: where the run would go and what a start
    there would do, the training data and the step plan at this launch's world size."""

    out_dir: Path
    start: str
    source: Any  # the training split, opened (its images are not read)
    images: int
    steps: StepPlan
    world: int
    micro: int
    accum: int

    def plan(self, command: str, cfg, params: int, seconds_per_image: float | None, timing: str,
             notes: list[str] = ()) -> Plan:
        """The stage's plan: this outline, the network's `params` with AdamW state (and EMA), and the timing."""
        return Plan(command, self.out_dir, self.start, self.images, cfg.optim.batch_size, self.world, self.accum,
                    self.micro, self.steps.total_steps, self.steps.steps_per_epoch, cfg.optim.base_lr(), params,
                    state_bytes(params, 2, cfg.optim.ema is not None), seconds_per_image, timing, list(notes))


def outline(cfg, command: str, kind: str, name: str | None, config_file: str | None, resume: Checkpoint | None,
            force: bool, splits: list[str], restartable=None) -> Outline:
    """The run directory (`name` names a new one under runs/), the start it would get, the splits present, and the
    steps over the training images; refusals raise as a start's would."""
    world = world_size()
    micro, accum = cfg.optim.accumulation(world)
    out_dir = rundir.resolve(command, kind, cfg.run.out_dir, name, resume.path if resume else None)
    start = start_of(out_dir, command, kind, force, resume.extra["step"] if resume else None,
                     kept_config(config_file, out_dir), restartable)
    check_splits(cfg.data, splits)
    source = open_source(cfg.data, "train")
    images = min(len(source), cfg.data.limit or len(source))
    steps = plan_steps(images, cfg.optim, cfg.run.seed, SimpleNamespace(rank=0, world=world))
    return Outline(out_dir, start, source, images, steps, world, micro, accum)


def seconds_per_image(step: Callable[[], None], images: int, repeats: int = 3) -> float:
    """The median time of `step` (one optimizer step on `images` synthetic images) per image, after a warm-up."""
    import torch

    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] / images


def state_bytes(params: int, optimizer_slots: int = 2, ema: bool = False) -> int:
    """fp32 weights and gradients, AdamW's two moments (or another optimizer's slots), and the EMA copy."""
    return params * 4 * (2 + optimizer_slots + (1 if ema else 0))
