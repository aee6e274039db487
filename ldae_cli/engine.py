"""Pieces every training stage shares: optimizer and lr schedule settings, run directories,
resumable train state in the shared checkpoint format, clean stops on Ctrl-C / SIGTERM / time limit.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from timm.utils import ModelEmaV3

from ldae_cli.checkpoint import Checkpoint, flatten_optimizer, unflatten_optimizer
from ldae_cli.data import StepBatches
from ldae_cli.distributed import all_reduce_sum
from ldae_cli.errors import LdaeError
from ldae_cli.reporting import console, progress_bar


# what to change when a training loss stops being finite
DIVERGED_HINT = "Lower the lr (optim.blr or optim.lr), set optim.clip_grad, or check the data"


@dataclass
class OptimConfig:
    batch_size: int = 2048  # global batch (all ranks, all accumulation steps)
    micro_batch: Optional[int] = None  # per rank per forward; null = batch_size / ranks (no accumulation)
    blr: float = 1e-4  # lr = blr * batch_size / 256
    lr: Optional[float] = None  # absolute lr, overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: float = 400.0
    warmup_epochs: float = 100.0
    clip_grad: Optional[float] = None
    ema: Optional[float] = None  # EMA decay of the weights, e.g. 0.9999; null = no EMA

    def validate(self) -> None:
        if self.batch_size < 1:
            raise LdaeError(f"optim.batch_size must be positive, got {self.batch_size}")
        if self.epochs <= 0 or self.warmup_epochs < 0:
            raise LdaeError("optim.epochs must be positive and optim.warmup_epochs non-negative")
        if len(self.betas) != 2:
            raise LdaeError(f"optim.betas needs two values, got {self.betas}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise LdaeError(f"optim.ema is a decay in (0, 1), got {self.ema}")

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def accumulation(self, world: int) -> tuple[int, int]:
        return accumulation(self.batch_size, self.micro_batch, world)


def accumulation(batch_size: int, micro_batch: int | None, world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) that make `batch_size` over `world` ranks."""
    per_rank, rem = divmod(batch_size, world)
    if rem:
        raise LdaeError(f"optim.batch_size {batch_size} is not divisible by {world} ranks")
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise LdaeError(f"optim.micro_batch {micro} does not divide the per-rank batch {per_rank}")
    return micro, per_rank // micro


@dataclass
class RunConfig:
    out_dir: Optional[str] = None  # default: runs/<stage>/<config name>
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    log_every: int = 20  # steps between metrics.jsonl lines (and the NaN check)
    save_every: int = 500  # steps between checkpoints (one is always written at the end)
    time_limit_minutes: Optional[float] = None  # stop cleanly (checkpoint written) after this long; resume later
    stop_after_steps: Optional[int] = None  # stop cleanly after this many steps of this invocation
    progress: bool = True


@dataclass
class StepPlan:
    """How a run of `optim` over n images is cut into optimizer steps on this rank."""

    batches: StepBatches
    micro: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float
    min_lr: float

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)


def plan_steps(n_images: int, optim: OptimConfig, seed: int, ctx) -> StepPlan:
    micro, accum = optim.accumulation(ctx.world)
    batches = StepBatches(n_images, optim.batch_size, seed, ctx.rank, ctx.world, accum)
    per_epoch = batches.steps_per_epoch
    return StepPlan(batches, micro, accum, per_epoch, max(1, round(optim.epochs * per_epoch)),
                    round(optim.warmup_epochs * per_epoch), optim.base_lr(), optim.min_lr)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warm-up then half-cycle cosine to min_lr (MAE/DiT practice)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_adamw(params, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW at the run's base lr; parameter groups may carry their own weight decay and lr_scale."""
    return torch.optim.AdamW(params, lr=optim.base_lr(), betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=device.type == "cuda")


def make_ema(model: torch.nn.Module, decay: float | None) -> ModelEmaV3 | None:
    """ema <- decay * ema + (1 - decay) * weights after every optimizer step (no warm-up)."""
    return ModelEmaV3(model, decay=decay) if decay else None


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def run_dir(stage: str, cfg_out: str | None, config_name: str | None) -> Path:
    if cfg_out:
        return Path(cfg_out)
    name = Path(config_name).stem if config_name else "default"
    return Path("runs") / stage / name


def open_run_dir(command: str, kind: str, out: str | None, name: str | None, resume_ckpt, checkpoint: str) -> Path:
    """The run directory: the resumed checkpoint's, else run.out_dir or runs/<kind>/<name>, never a finished or
    running one (nothing already written is overwritten)."""
    if resume_ckpt is not None and not out:
        return resume_ckpt.path.parent
    path = run_dir(kind, out, name)
    if resume_ckpt is None and (path / checkpoint).exists():
        raise LdaeError(f"{path} already holds a {kind} checkpoint; continue it with `ldae {command} --resume "
                        f"{path}` or pick another run.out_dir (--out)")
    return path


class StopSignal:
    """First Ctrl-C / SIGTERM asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self, time_limit_minutes: float | None = None):
        self.requested = False
        self.reason = ""
        self.deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes else None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
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


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = flatten_optimizer(optimizer.state_dict())
    return {f"{prefix}.{k}": v for k, v in tensors.items()}, rest


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    """`tensors`: the checkpoint section written by `optimizer_tensors` (prefix removed)."""
    state = unflatten_optimizer(tensors, rest)
    if not state["state"]:
        raise LdaeError("the checkpoint holds no optimizer state to resume from")
    device = next(iter(optimizer.param_groups[0]["params"])).device
    for entry in state["state"].values():
        for key, value in entry.items():
            # AdamW keeps `step` on the CPU unless fused/capturable
            if torch.is_tensor(value) and key != "step":
                entry[key] = value.to(device)
    optimizer.load_state_dict(state)


def restore_run(ck: Checkpoint | None, ctx, total_steps: int, modules: dict, optimizer: torch.optim.Optimizer) -> int:
    """Load a resumed run's module sections (name -> module; None is skipped) and optimizer; returns the
    step to continue from, 0 for a new run."""
    if ck is None:
        return 0
    for section, module in modules.items():
        if module is not None:
            module.load_state_dict(ck.section(section))
    restore_optimizer(optimizer, ck.section("optim"), ck.extra["optimizer"])
    if ctx.is_main:
        console.print(f"resuming {ck.path} at step {ck.extra['step']:,} of {total_steps:,}")
    return ck.extra["step"]


def finished_already(start_step: int, total_steps: int, ctx) -> bool:
    if start_step >= total_steps and ctx.is_main:
        console.print("this run has already finished; nothing to do")
    return start_step >= total_steps


def resume_base(stored: dict) -> dict:
    """The stored config to continue from, minus the limits of the interrupted invocation (give them again)."""
    return {**stored, "run": {**stored.get("run", {}), "stop_after_steps": None, "time_limit_minutes": None}}


def check_resume_config(stored: dict, current: dict, allowed: tuple[str, ...]) -> None:
    """A resumed run must continue the same recipe; only keys in `allowed` (paths, devices, logging) may change."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(stored), flat(current)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(allowed)]
    if changed:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:4])
        raise LdaeError(f"--resume continues the stored run, but the config differs ({details}); resume without "
                        f"changing the recipe (only {', '.join(allowed)} may change) or start a new run directory")


class TrainLoop:
    """The cadence every training loop shares: progress bar, throughput, when to log and save, the NaN guard,
    clean stops (Ctrl-C, SIGTERM, time limit, stop_after_steps). The loop body stays the caller's:

        with TrainLoop("pretrain", cfg.run, out_dir, ctx, start, total, steps_per_epoch, batch) as loop:
            while loop.running:
                ...one optimizer step, its losses added to `meter`...
                if loop.end_step(metrics, meter, "lower the lr", save, lr=lr):
                    break

    Loops that evaluate between steps call `advance`, `log`, `saved` and `stopped` themselves.
    """

    def __init__(self, command: str, run: RunConfig, out_dir: Path, ctx, start_step: int, total_steps: int,
                 steps_per_epoch: float, batch_size: int, shown: tuple[str, ...] = ("loss", "lr")):
        self.command, self.run, self.out_dir, self.ctx, self.shown = command, run, out_dir, ctx, shown
        self.start_step = self.step = self.last_saved = self.logged = start_step
        self.total_steps, self.steps_per_epoch, self.batch_size = total_steps, steps_per_epoch, batch_size
        self.stopping = self.due_save = self.due_log = False
        self.rate = float("nan")
        self._meter = Throughput()
        self._started = time.time()

    def __enter__(self) -> "TrainLoop":
        self._stop = StopSignal(self.run.time_limit_minutes).__enter__()
        self.progress = progress_bar("img", self.run.progress and self.ctx.is_main).__enter__()
        self.console = self.progress.console
        self._task = self.progress.add_task(self.command, total=self.total_steps * self.batch_size,
                                        completed=self.start_step * self.batch_size, info="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
        self._stop.__exit__(*exc)

    @property
    def running(self) -> bool:
        return self.step < self.total_steps

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def seconds(self) -> float:
        return time.time() - self._started

    def advance(self, save_now: bool = False) -> None:
        """Call after each optimizer step; sets `due_log`, `due_save` and `stopping`."""
        self.step += 1
        self.rate = self._meter.mark(self.batch_size)
        self.progress.update(self._task, advance=self.batch_size)
        limit = self.run.stop_after_steps
        self.stopping = self._stop.should_stop() or (limit is not None and self.step - self.start_step >= limit)
        self.due_save = (self.step - self.last_saved >= self.run.save_every or self.step == self.total_steps
                         or self.stopping or save_now)
        self.due_log = self.step % self.run.log_every == 0 or self.due_save

    def end_step(self, metrics, meter: "LossMeter", hint: str, save, **values) -> bool:
        """The usual tail of an optimizer step: advance, log (see `log`), `save(step)` when due; True when
        the run should end early."""
        self.advance()
        if self.due_log:
            self.log(metrics, meter, hint, **values)
        if self.due_save:
            save(self.step)
            self.saved()
        return self.stopped()

    def log(self, metrics, meter: "LossMeter", hint: str, **values) -> None:
        """Average the meter over all ranks, stop on a non-finite loss (its first term; `hint` says what to
        change), and write a metrics.jsonl line of the means and `values`."""
        means = meter.take(self.ctx)
        first = means.get(meter.names[0], 0.0)
        if not math.isfinite(first):
            raise LdaeError(f"loss became {first} between steps {self.logged} and {self.step}; the last good "
                            f"checkpoint (step {self.last_saved}) is kept in {self.out_dir}. {hint}")
        metrics.write(self.record(**means, **values))

    def record(self, **values) -> dict:
        """A metrics.jsonl line: step, epoch, the caller's values, throughput and time; updates the bar."""
        self.logged = self.step
        shown = "  ".join(f"{k} {values[k]:.4g}" for k in self.shown if isinstance(values.get(k), float))
        self.progress.update(self._task, info=f"{shown}  ep {self.epoch:.2f}")
        return {"step": self.step, "epoch": round(self.epoch, 4), **values,
                "img_per_s": round(self.rate, 1) if self.rate == self.rate else None,
                "time_s": round(self.seconds, 1)}

    def saved(self) -> None:
        self.last_saved = self.step

    def stopped(self) -> bool:
        """True when the run should end early (the checkpoint of this step is already saved)."""
        if self.stopping and self.step < self.total_steps:
            if self.ctx.is_main:
                why = self._stop.reason or "stop_after_steps"
                console.print(f"stopped at step {self.step:,} ({why}); checkpoint saved. Continue with "
                              f"`ldae {self.command} --resume {self.out_dir}`")
            return True
        return False


class LossMeter:
    """Float64 sums of named loss terms kept on the device between log lines, so a step never waits for the
    GPU; `TrainLoop.log` reads them as means over every rank."""

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

    def take(self, ctx=None) -> dict[str, float]:
        """The means since the last take, over every rank of `ctx` (None: this process only); resets the sums.
        A term nothing was added to is left out."""
        totals = all_reduce_sum(self.sums.clone(), ctx) if ctx is not None else self.sums.clone()
        self.sums.zero_()
        return {name: float(totals[0, i] / totals[1, i]) for i, name in enumerate(self.names) if totals[1, i] > 0}


class Throughput:
    """Images per second over a sliding window of optimizer steps."""

    def __init__(self, window: int = 20):
        self.window, self.marks = window, []

    def mark(self, images: int) -> float:
        now = time.perf_counter()
        self.marks.append((now, images))
        self.marks = self.marks[-self.window - 1:]
        if len(self.marks) < 2:
            return float("nan")
        span = self.marks[-1][0] - self.marks[0][0]
        return sum(n for _, n in self.marks[1:]) / span if span > 0 else float("nan")
