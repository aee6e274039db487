"""The training loop: one `Trainer` owns a run from its first step to its last checkpoint.

A stage builds its network, data and optimizers; its `engine_<stage>` module gives the Trainer the built train
state (modules, optimizers, EMA), a step function (one optimizer step: forward, backward, update, its losses added
to `trainer.meter`) and hooks for what the run does besides (log lines, curves, dashboard pictures, the stage's
checkpoint content, evaluations: hooks.py). The Trainer does the rest the same way for every stage, as
detectron2's TrainerBase does with its hooks:

- the plan: steps, epochs and the lr of every step, applied to each optimizer's parameter groups;
- the train state, saved and restored in one schema (`TrainState`), atomically, on one rank;
- the cadence: a metrics.jsonl line every run.log_every steps, a checkpoint every run.save_every steps and at
  the end (every one a multiple of its period, so a resumed run keeps it), clean stops on Ctrl-C / SIGTERM /
  time limit / stop_after_steps, and the NaN guard;
- the EMA update, DDP and torch.compile wrapping, the seeded image stream.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ldae_cli.data.pipeline import BadImageCounter, Batch, ImageDataset, decode_batch, make_loader
from ldae_cli.errors import Interrupted, LdaeError
from ldae_cli.runs.checkpoint import save_checkpoint
from ldae_cli.runs.distributed import PREEMPTIBLE, all_reduce_sum, barrier, ddp_wrap
from ldae_cli.runs.logs import Board, MetricsLog, console, note_kept, progress_bar
from ldae_cli.settings.optim import StepPlan, set_lr
from ldae_cli.train.session import Session
from ldae_cli.train.train_state import TrainState

# what to change when a training loss stops being finite
DIVERGED_HINT = "Lower the lr (optim.blr or optim.lr), set optim.clip_grad, or check the data"


class ImageStream:
    """This rank's micro-batches from the restored step on, in the plan's seeded order; unreadable images are
    raised or skipped and counted (data.on_bad_image)."""

    def __init__(
        self,
        dataset: ImageDataset,
        plan: StepPlan,
        start: int,
        num_workers: int,
        on_bad_image: str,
        device: torch.device,
        sampler=None,
    ):
        assert plan.batches is not None  # a plan of seeded steps (a stream's, not cached features')
        plan.batches.start_step, plan.batches.total_steps = start, plan.total_steps
        self._batches = iter(
            make_loader(dataset, sampler or plan.batches, num_workers, pin_memory=device.type == "cuda")
        )
        self._bad = BadImageCounter(on_bad_image)
        self._dropped = dataset.skipped  # left out when the dataset was cached
        self._decode = (dataset.size, device) if dataset.encoded else None
        self.waited = 0.0  # seconds the loop spent waiting for batches (reading, decoding)

    @property
    def skipped(self) -> int:
        """Unreadable images skipped so far: dropped when caching, or met in batches."""
        return self._dropped + self._bad.skipped

    def next(self) -> Batch:
        started = time.perf_counter()
        batch = self._bad.check(next(self._batches))
        if self._decode is not None:
            batch = decode_batch(batch, *self._decode)
        self.waited += time.perf_counter() - started
        return batch


class Hook:
    """Something a run does besides its steps (detectron2's HookBase); concrete ones are in hooks.py. Every
    method runs on every rank unless it says otherwise."""

    # the keys of the checkpoint's extra this hook owns: its attributes of those names, saved in every checkpoint and
    # restored on resume (Trainer.save refuses a key that two writers give: one value would be lost)
    owns: tuple[str, ...] = ()
    layout: dict = {}  # TensorBoard charts of its metrics (custom scalars: {category: {title: ["Multiline", keys]}})

    def load_state(self, extra: dict) -> None:
        for key in self.owns:
            setattr(self, key, extra.get(key))

    def checkpoint(self, trainer: "Trainer") -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, extra) this hook adds to every checkpoint (main rank); default: no tensors, what it owns."""
        return {}, {key: getattr(self, key) for key in self.owns}

    def wants_save(self, trainer: "Trainer") -> bool:
        """After an optimizer step: ask for a checkpoint (and a log line) at this step."""
        return False

    def after_log(self, trainer: "Trainer", record: dict) -> None:
        """A metrics.jsonl line was written (main rank)."""

    def after_step(self, trainer: "Trainer") -> dict | None:
        """After the step's log line, before its checkpoint: values for a metrics line of their own at this step."""

    def after_save(self, trainer: "Trainer") -> None:
        """A checkpoint was written (main rank)."""

    def after_last_save(self, trainer: "Trainer") -> bool:
        """The last step's checkpoint is written (or was, by a run resumed now): True asks for one more checkpoint."""
        return False

    def after_train(self, trainer: "Trainer") -> None:
        """`fit` returns: the run finished (step == total_steps) now or before, or stopped at a limit of its config."""


class Trainer:
    """One training run: see the module docstring. Typical use, in an `engine_<stage>` module:

    state = TrainState({"model": model}, {"optim": optimizer}, ema=make_ema(model, cfg.optim.ema))
    trainer = Trainer(session, plan, state, [LogLine(), Curves(Curve("loss.png", ("loss",), "loss"))])
    stream = trainer.stream(dataset, cfg.data)
    def step(step: int) -> dict:
        ...forward / backward / optimizer.step() on stream.next() batches...
        trainer.meter.add("loss", loss_sum, count)
    trainer.fit(step)
    """

    def __init__(
        self,
        session: Session,
        plan: StepPlan,
        state: TrainState,
        hooks: list[Hook] | tuple[Hook, ...] = (),
        losses: tuple[str, ...] = ("loss",),
        hint: str = DIVERGED_HINT,
    ):
        self.session, self.plan, self.ctx, self.run = session, plan, session.ctx, session.run
        self.path = session.checkpoint
        self.state, self.ema, self.modules, self.optimizers = state, state.ema, state.modules, state.optimizers
        self.hint, self.hooks = hint, list(hooks)
        self.meter = LossMeter(losses, self.ctx.device)
        self.total_steps, self.steps_per_epoch = plan.total_steps, plan.steps_per_epoch
        self.step = 0
        if session.resume is not None:
            self.step = TrainState.read(session.resume, self.modules, self.optimizers)
            self.meter.load(session.resume.section("meter"), self.ctx)
            for hook in self.hooks:
                hook.load_state(session.resume.extra)
            if self.ctx.is_main:
                console.print(f"resuming {session.resume.path} at step {self.step:,} of {self.total_steps:,}")
        self.start_step = self.last_saved = self.logged = self.step
        resumed_at = self.step if session.resume is not None else None
        tb, wb = (
            session.output(name) if wanted else None
            for name, wanted in (("tensorboard", self.run.tensorboard), ("wandb", self.run.wandb))
        )
        layout = {category: charts for hook in self.hooks for category, charts in hook.layout.items()}
        self.board = Board(tb, wb, resumed_at, session.config, layout) if self.ctx.is_main and (tb or wb) else None
        self.metrics = MetricsLog(session.output("metrics.jsonl"), self.ctx.is_main, resumed_at, self.board)
        self._stream: ImageStream | None = None
        self.data_identity: str | None = None
        self.progress, self.bar_task = None, None  # the live progress bar while `fit` runs, and the run's task in it
        self._wait_mark, self._warned_wait = (time.perf_counter(), 0.0, False), False
        self.rate = float("nan")
        self._throughput = Throughput()
        self._started = time.time()

    # --- what a step function uses -----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def wrap(self, module: nn.Module, ddp: bool = True) -> nn.Module:
        """The module as the step should call it: under DDP when several ranks run, compiled when run.compile."""
        runner = ddp_wrap(module, self.ctx) if ddp and self.ctx.enabled else module
        return torch.compile(runner) if self.run.compile else runner  # type: ignore[return-value]  # a Module

    def stream(self, dataset: ImageDataset, data_cfg, sampler=None) -> ImageStream:
        """The plan's seeded batches of `dataset` from the current step (or `sampler`'s, which iterates over
        them); skipped images go into every log line. A resumed run must read the data it trained on."""
        self.data_identity = dataset.source.identity()
        resume = self.session.resume
        if resume is not None and resume.extra.get("data_identity") not in (None, self.data_identity):
            raise LdaeError(
                f"--resume: the training data ({data_cfg.path or data_cfg.source}) is not the data "
                f"{resume.path} trained on (its files, sizes or labels differ); resume with "
                "the original data (the same files may have moved) or start a new run"
            )
        self._stream = ImageStream(
            dataset, self.plan, self.step, data_cfg.num_workers, data_cfg.on_bad_image, self.device, sampler=sampler
        )
        return self._stream

    def announce(self, what: str, lr: float, details: str = "") -> None:
        """The run's banner: what trains on what, the batch split over ranks and micro-batches, steps, lr."""
        if self.ctx.is_main:
            p = self.plan
            console.print(
                f"{self.session.command}: {what}, batch {p.batch_size} ({self.ctx.world} rank(s) x "
                f"{p.accum} x {p.micro}), {p.total_steps:,} steps ({p.total_steps / p.steps_per_epoch:g} "
                f"epochs), lr {lr:.3g}{details}, device {self.device}"
            )

    # --- the run -----------------------------------------------------------------------------

    def fit(self, step_fn: Callable[[int], dict | None]) -> bool:
        """Run the plan from the restored step, then the hooks' after_train. `step_fn(step)` does one optimizer step
        and may return values to log beside the losses. True when the run has reached its last step (now or before)."""
        try:
            finished = self._run(step_fn)
            for hook in self.hooks:
                hook.after_train(self)
            return finished
        finally:
            if self.board is not None:
                self.board.close()

    def _run(self, step_fn: Callable[[int], dict | None]) -> bool:
        if self.step >= self.total_steps:  # stopped between the last checkpoint and its evaluation, or done
            if any([hook.after_last_save(self) for hook in self.hooks]):
                self.save()
            elif self.ctx.is_main:
                console.print("this run has already finished; nothing to do")
            return True
        self.session.training = True  # from here a failure keeps what the run wrote (metrics show what happened)
        with (
            StopSignal(self.run.time_limit_minutes) as stop,
            progress_bar("img", self.run.progress and self.ctx.is_main, line_every=None) as bar,
        ):
            self.progress = bar
            self._wait_mark = (time.perf_counter(), 0.0, False)
            task = self.bar_task = bar.add_task(
                self.session.command,
                total=self.total_steps * self.plan.batch_size,
                completed=self.step * self.plan.batch_size,
                info="",
            )
            while self.step < self.total_steps:
                values = self._step(step_fn)
                bar.update(task, advance=self.plan.batch_size)
                limit = self.run.stop_after_steps
                stopping = stop.should_stop() or (limit is not None and self.step - self.start_step >= limit)
                self._after_step(values, stopping)
                if stopping and self.step < self.total_steps:
                    return self._stopped(stop.reason)
        if self.ctx.is_main:
            console.print(
                f"finished {self.total_steps:,} steps in {time.time() - self._started:.0f}s; wrote {self.path}"
            )
        return True

    def _step(self, step_fn: Callable[[int], dict | None]) -> dict:
        """One optimizer step at the plan's lr (the step function's work), then the EMA; the values to log."""
        lr = self.plan.lr(self.step)
        if not math.isfinite(lr):
            raise LdaeError(f"the lr schedule gives {lr} at step {self.step}; {self.kept()}. {self.hint}")
        for optimizer in self.optimizers.values():
            set_lr(optimizer, lr)
        values = {"lr": lr, **(step_fn(self.step) or {})}
        if self.ema is not None:
            self.ema.update(self.modules["model"])
        self.step += 1
        self.rate = self._throughput.mark(self.plan.batch_size)
        return values

    def _after_step(self, values: dict, stopping: bool) -> None:
        """The cadence: a log line, the hooks, a checkpoint when due, and the final one's extra round. Every step
        of it is a multiple of its period (or the last step, or a hook's), so a run stopped and resumed logs and
        saves at the same steps as one that never stopped; a stop saves without a log line (the meter's sums go
        into the checkpoint instead)."""
        due_save = (
            self.step % self.run.save_every == 0
            or self.step == self.total_steps
            or any(hook.wants_save(self) for hook in self.hooks)
        )
        if self.step % self.run.log_every == 0 or due_save:
            self.log(values)
        due_save = due_save or stopping
        for hook in self.hooks:
            record = hook.after_step(self)
            if record:
                self.metrics.write({"step": self.step, **record})
        if due_save:
            self.save()
        if self.step == self.total_steps and any([hook.after_last_save(self) for hook in self.hooks]):
            self.save()

    def _stopped(self, reason: str) -> bool:
        """A stop before the last step, its checkpoint written: a signal ends the process (exit 130 / 143) with one
        line, a limit of the config (stop_after_steps, time limit) returns False."""
        line = (
            f"stopped at step {self.step:,} ({reason or 'stop_after_steps'}); the checkpoint of step "
            f"{self.step:,} in {self.path.parent} is kept. Continue with `ldae {self.session.command} --resume "
            f"{self.path.parent}`"
        )
        if reason in ("SIGINT", "SIGTERM", "SIGUSR2"):
            raise Interrupted(line, 130 if reason == "SIGINT" else 143, reason)
        if self.ctx.is_main:
            console.print(line)
        return False

    def log(self, values: dict) -> None:
        """Average the meter over all ranks, stop on a non-finite loss (its first term), and write a
        metrics.jsonl line of the means, `values`, throughput and time; the hooks see it (bar, plain line)."""
        means = self.meter.take(self.ctx)
        first = means.get(self.meter.names[0], 0.0)
        if not math.isfinite(first):
            raise LdaeError(
                f"loss became {first} between steps {self.logged} and {self.step}; {self.kept()}. {self.hint}"
            )
        if self._stream is not None:
            values = {**values, "skipped_images": self._stream.skipped, "data_wait": self._data_wait(self._stream)}
        self.logged = self.step
        record = {
            "step": self.step,
            "epoch": round(self.epoch, 4),
            **means,
            **values,
            "img_per_s": round(self.rate, 1) if self.rate == self.rate else None,
            "time_s": round(time.time() - self._started, 1),
        }
        self.metrics.write(record)
        if self.ctx.is_main:
            for hook in self.hooks:
                hook.after_log(self, record)

    def _data_wait(self, stream: ImageStream) -> float | None:
        """The share of the time since the last log line the loop waited for batches; warns once above 10% (the
        first interval, with the loader's start-up, does not count)."""
        now, waited = time.perf_counter(), stream.waited
        span, share = now - self._wait_mark[0], None
        if span > 0:
            share = round((waited - self._wait_mark[1]) / span, 3)
        if share is not None and share > 0.1 and self._wait_mark[2] and not self._warned_wait and self.ctx.is_main:
            self._warned_wait = True
            console.print(
                f"[yellow]warning:[/yellow] the loop waits for data {100 * share:.0f}% of the time: prepare "
                "the dataset once (`ldae prepare-data`), add data.num_workers, or decode on the GPU "
                "(data.decode=gpu)"
            )
        self._wait_mark = (now, waited, True)
        return share

    def kept(self) -> str:
        """What the NaN guard leaves: the last checkpoint written (or resumed from), never one that was not."""
        if self.path.exists() and (self.last_saved > self.start_step or self.session.resume is not None):
            return f"the last good checkpoint (step {self.last_saved}) is kept in {self.path.parent}"
        return "no checkpoint was written before (the run had not reached its first save)"

    def save(self) -> None:
        """The checkpoint of the current step (rank 0 writes, every rank waits), then the hooks' after_save (curves,
        pictures). Weights, optimizer state or loss sums that are not finite are never saved: the run stops,
        keeping the last good one."""
        bad = self.state.first_non_finite()  # weights, optimizer state, or the stage's own rule
        if bad is not None:
            raise LdaeError(f"{bad} became non-finite by step {self.step}; {self.kept()}. {self.hint}")
        meter = self.meter.state(self.ctx)  # the sums since the last log line (every rank's), for an exact resume
        if not bool(torch.isfinite(meter).all()):
            raise LdaeError(
                f"loss became non-finite between steps {self.logged} and {self.step}; {self.kept()}. {self.hint}"
            )
        if self.ctx.is_main:
            writers = [(type(hook).__name__, *hook.checkpoint(self)) for hook in self.hooks]  # description, evaluations
            writers += [
                (
                    "TrainState",
                    *TrainState.write(
                        self.step, self.total_steps, self.steps_per_epoch, self.ctx.world, self.modules, self.optimizers
                    ),
                ),
                (
                    "Trainer",
                    {"meter.sums": meter},
                    {"data_identity": self.data_identity} if self.data_identity is not None else {},
                ),
            ]
            tensors = merged([(name, entries) for name, entries, _ in writers])
            extra = merged([(name, entries) for name, _, entries in writers])
            save_checkpoint(self.path, self.session.kind, tensors, self.session.config, self.state.parents, extra)
            for hook in self.hooks:
                hook.after_save(self)
        barrier(self.ctx)
        self.last_saved = self.step
        note_kept(
            f"the checkpoint of step {self.step} in {self.path.parent} (continue with `ldae "
            f"{self.session.command} --resume {self.path.parent}`)"
        )


def merged(writers: list[tuple[str, dict]]) -> dict:
    """The named writers' entries in one dict; a key two of them write (one value would be lost) is refused."""
    union: dict = {}
    owner: dict[str, str] = {}
    for name, entries in writers:
        for key in entries:
            if key in owner:
                raise RuntimeError(f"checkpoint key '{key}' is written by both {owner[key]} and {name}")
            owner[key] = name
        union.update(entries)
    return union


class StopSignal:
    """First Ctrl-C / SIGTERM asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self, time_limit_minutes: float | None = None):
        self.requested = False
        self.reason = ""
        self.deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes else None
        self._previous: dict[signal.Signals, Any] = {}  # the handlers to restore

    def __enter__(self):
        # a job under `ldae launch` is also warned by SIGUSR2 before a preemption or its time limit
        extra = (signal.SIGUSR2,) if os.environ.get(PREEMPTIBLE) else ()
        for sig in (signal.SIGINT, signal.SIGTERM, *extra):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.reason = True, signal.Signals(signum).name

    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.requested, self.reason = True, "time limit"
        return self.requested


class LossMeter:
    """Float64 sums of named loss terms kept on the device between log lines, so a step never waits for the
    GPU; `Trainer.log` reads them as means over every rank."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.sums = torch.zeros(2, len(names), dtype=torch.float64, device=device)  # row 0: sums, row 1: counts

    def add(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float = 1) -> None:
        i = self.names.index(name)
        self.sums[0, i] += total
        self.sums[1, i] += count

    def add_all(self, values: torch.Tensor, count: float = 1) -> None:
        """One value per term, in the order of `names`: a single update instead of one per term."""
        self.sums[0] += values
        self.sums[1] += count

    def state(self, ctx=None) -> torch.Tensor:
        """The sums and counts since the last take, over every rank of `ctx`, without resetting them."""
        return all_reduce_sum(self.sums.clone(), ctx) if ctx is not None else self.sums.clone()

    def load(self, saved: dict[str, torch.Tensor], ctx) -> None:
        """Continue from `state()` as saved in a checkpoint (on one rank: the others start from zero, so the
        all-rank total is what was saved). Checkpoints written before it was saved hold none."""
        sums = saved.get("sums")
        if sums is not None and tuple(sums.shape) == tuple(self.sums.shape) and ctx.is_main:
            self.sums.copy_(sums.to(self.sums.device, self.sums.dtype))

    def take(self, ctx=None) -> dict[str, float]:
        """The means since the last take, over every rank of `ctx` (None: this process only); resets the sums.
        A term nothing was added to is left out."""
        totals = all_reduce_sum(self.sums.clone(), ctx) if ctx is not None else self.sums.clone()
        self.sums.zero_()
        return {name: float(totals[0, i] / totals[1, i]) for i, name in enumerate(self.names) if totals[1, i] > 0}


class Throughput:
    """Images per second over a sliding window of optimizer steps."""

    def __init__(self, window: int = 20):
        self.window = window
        self.marks: list[tuple[float, int]] = []

    def mark(self, images: int) -> float:
        now = time.perf_counter()
        self.marks.append((now, images))
        self.marks = self.marks[-self.window - 1 :]
        if len(self.marks) < 2:
            return float("nan")
        span = self.marks[-1][0] - self.marks[0][0]
        return sum(n for _, n in self.marks[1:]) / span if span > 0 else float("nan")


def micro_batches(stream: ImageStream, count: int, device: torch.device) -> Iterator[Batch]:
    """`count` micro-batches of one optimizer step, moved to the device."""
    for _ in range(count):
        batch = stream.next()
        yield Batch(batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True), batch.bad)
