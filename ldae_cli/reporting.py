"""Terminal output and run records shared by every stage: rich progress bars, tables, metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


# what this process has saved so far, for the one line an interrupt prints
_kept: dict[str, str | None] = {"note": None}


def note_kept(text: str | None) -> None:
    _kept["note"] = text


def kept() -> str | None:
    """What an interrupt leaves behind, e.g. 'the checkpoint of step 120 in runs/x'; None when nothing."""
    return _kept["note"]


class RateColumn(ProgressColumn):
    """Items per second (images, patches) from rich's own speed estimate."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


def progress_bar(unit: str = "img", enabled: bool = True) -> Progress:
    """A progress bar with rate and ETA; tasks carry an `info` field (loss, lr, ...)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, disable=not enabled, transient=False, refresh_per_second=4,
    )


class MetricsLog:
    """Appends one JSON object per line; resumed runs keep the lines written before the interruption. A line
    torn by a kill mid-write (the last one) is dropped, never a reason to refuse a resume."""

    def __init__(self, path: Path, enabled: bool = True, truncate_after_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if truncate_after_step is not None and self.path.exists():
                # lines logged after the checkpoint we resume from would be logged again: drop them
                text = "".join(json.dumps(r) + "\n" for r in read_metrics(self.path)
                               if r.get("step", -1) <= truncate_after_step)
                if text != self.path.read_text(errors="replace"):
                    self.path.write_text(text)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not a JSON object (torn by a kill) is skipped."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
