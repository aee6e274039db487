"""Terminal output and run records shared by every stage: rich progress bars, tables, metrics.jsonl."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn
from rich.table import Column
from rich.text import Text

from ldae_cli.errors import LdaeError
from ldae_cli.runs.rundir import open_own, read_own, write_atomically

# soft_wrap: a line is never broken by rich (a log file gets whole lines, paths are never split; a terminal wraps them)
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


# what this process has saved so far, for the one line an interrupt prints
_kept: dict[str, str | None] = {"note": None}


def note_kept(text: str | None) -> None:
    _kept["note"] = text


def kept() -> str | None:
    """What an interrupt leaves behind, e.g. 'the checkpoint of step 120 in runs/x'; None when nothing."""
    return _kept["note"]


class RateColumn(ProgressColumn):
    """Items per second (images, patches) from rich's own speed estimate."""

    def __init__(self, unit: str, table_column: Column | None = None):
        super().__init__(table_column)
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        shown = f"{speed / 1000:,.0f}k" if speed >= 10_000 else f"{speed:,.0f}"
        return Text(f"{shown} {self.unit}/s", style="progress.data.speed")


def progress_bar(unit: str = "img", enabled: bool = True, line_every: float | None = 30.0):
    """A progress bar with rate and ETA on a terminal; tasks carry an `info` field (loss, lr, ...). Where output
    is a file or a pipe (nohup, a batch scheduler) a bar shows nothing, so plain lines are printed instead:
    every `line_every` seconds and when a task completes (None: never; the caller prints its own)."""
    if enabled and not console.is_terminal:
        return PlainProgress(unit, line_every)
    # one line in an 80-column terminal: name, a short bar, %, rate, elapsed<ETA, then the losses (cut, not wrapped)
    one_line = partial(Column, no_wrap=True, overflow="ellipsis")
    return Progress(
        TextColumn("[bold]{task.description}", table_column=one_line()),
        BarColumn(bar_width=10),
        TaskProgressColumn(table_column=one_line()),
        RateColumn(unit, table_column=one_line()),
        ClockColumn(table_column=one_line()),
        TextColumn("{task.fields[info]}", table_column=one_line()),
        console=console,
        disable=not enabled,
        transient=False,
        refresh_per_second=4,
    )


class ClockColumn(ProgressColumn):
    """Elapsed and remaining time in one short cell, `1:23<9:05` (hours shown only when there are some)."""

    def render(self, task) -> Text:
        remaining = task.time_remaining
        eta = short_clock(remaining) if remaining is not None else "?"
        return Text(f"{short_clock(task.elapsed or 0)}<{eta}", style="progress.elapsed")


def short_clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """`progress_bar`'s stand-in off a terminal: the same calls, progress as plain log lines."""

    def __init__(self, unit: str, line_every: float | None):
        self.unit, self.line_every, self.console = unit, line_every, console
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, info: str = "") -> int:
        now = time.monotonic()
        self.tasks[len(self.tasks)] = {
            "description": description,
            "total": total,
            "completed": completed,
            "start": completed,
            "info": info,
            "started": now,
            "printed": now,
        }
        return len(self.tasks) - 1

    def update(self, task: int, advance: float = 0, info: str | None = None) -> None:
        t = self.tasks[task]
        t["completed"] += advance
        if info is not None:
            t["info"] = info
        now = time.monotonic()
        done = t["total"] is not None and t["completed"] >= t["total"] and advance
        if self.line_every is not None and (done or now - t["printed"] >= self.line_every):
            t["printed"] = now
            console.print(self.line(t, now), soft_wrap=True)

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    def line(self, t: dict, now: float) -> str:
        elapsed = now - t["started"]
        rate = (t["completed"] - t["start"]) / elapsed if elapsed > 0 else 0.0
        total = t["total"] or 0
        eta = clock((total - t["completed"]) / rate) if rate > 0 and total else "?"
        share = f" ({100 * t['completed'] / total:.0f}%)" if total else ""
        return (
            f"{t['description']}: {t['completed']:,.0f}/{total:,.0f}{share}, {rate:,.0f} {self.unit}/s, "
            f"elapsed {clock(elapsed)}, eta {eta} {t['info']}"
        ).rstrip()


class Board:
    """Live dashboards beside metrics.jsonl: TensorBoard event files (run_dir/tensorboard) and, when asked, a W&B
    run, offline unless WANDB_MODE says otherwise (nothing leaves the machine by default). A resumed run
    purges what the interrupted one logged after its checkpoint, as metrics.jsonl does."""

    SKIPPED = ("step", "epoch", "time_s")

    def __init__(
        self, tensorboard: Path | None, wandb: Path | None, resumed_at: int | None, config: dict, layout: dict
    ):
        self.tb = self.wb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard), purge_step=resumed_at)
            if layout:  # the hooks' charts (Hook.layout)
                self.tb.add_custom_scalars(layout)
        if wandb:
            self.wb = start_wandb(wandb.parent, config)  # W&B makes its folder `wandb` in the one it is given

    def scalars(self, record: dict) -> None:
        values = {
            k: v
            for k, v in record.items()
            if k not in self.SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for key, value in values.items():
            if self.tb is not None:
                self.tb.add_scalar(key, value, record["step"])
        if self.wb is not None:
            self.wb.log(values, step=record["step"])

    def image(self, tag: str, image, step: int) -> None:
        """`image`: uint8 (3, H, W)."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step)
        if self.wb is not None:
            import wandb

            self.wb.log({tag: wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def start_wandb(out_dir: Path, config: dict):
    try:
        import wandb
    except ImportError:
        raise LdaeError(
            "run.wandb is true but wandb is not installed: `pip install wandb`, or set run.wandb=false "
            "(TensorBoard logs are written either way)"
        ) from None
    run_id = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:16]  # one W&B run across resumes
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "ldae"),
        name=out_dir.name,
        id=run_id,
        resume="allow",
        dir=str(out_dir),
        config=config,
        mode=os.environ.get("WANDB_MODE", "offline"),
    )


class MetricsLog:
    """Appends one JSON object per line; resumed runs keep the lines written before the interruption. A line
    torn by a kill mid-write (the last one) is dropped, never a reason to refuse a resume. Records also go to
    `board` (TensorBoard, W&B) when there is one."""

    def __init__(
        self, path: Path, enabled: bool = True, truncate_after_step: int | None = None, board: Board | None = None
    ):
        self.path, self.enabled, self.board = Path(path), enabled, board
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = read_own(self.path) if truncate_after_step is not None else None
            if old is not None:
                # lines logged after the checkpoint we resume from would be logged again: drop them
                text = "".join(
                    json.dumps(r) + "\n" for r in parse_metrics(old) if r.get("step", -1) <= truncate_after_step
                ).encode()
                if text != old:
                    write_atomically(self.path, text)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        fd = open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # never through a link
        try:
            os.write(fd, (json.dumps(clean) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.board is not None:
            self.board.scalars(clean)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (none when there is none); a FIFO or device there is named, never read."""
    return parse_metrics(read_own(Path(path), follow=True) or b"")


def parse_metrics(raw: bytes) -> list[dict]:
    """metrics.jsonl's records; a line that is not a JSON object (torn by a kill) is skipped."""
    records = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
