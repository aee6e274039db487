"""A study's runs as child processes of `ldae study` on this machine, up to `--jobs` at once in the study's order
(seed by seed, pretrains before probes), a probe as soon as its pretrain has finished. Each child has its own share
of the machine (studies/shares.py) and writes its output to its log under the study's logs/ folder (not its run
folder, which holds only what the run wrote: a file there that the run did not write would make it refuse the
folder). The terminal shows one live table; off a terminal the same states go out as plain lines.

A child that fails does not stop the others: the study finishes what it can, then names every failed run with its
own one-line error and log. Ctrl-C (from the terminal, it reaches every child) or SIGTERM (passed on to each) makes
every running child save and stop as a single run does; the same command again continues them."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.live import Live
from rich.table import Table
from rich.text import Text

from ldae_cli.errors import Interrupted, LdaeError, Terminated
from ldae_cli.runs.logs import clock, console
from ldae_cli.runs.rundir import check_own, open_own
from ldae_cli.studies.runner import Plan, Run, Timings, estimate, relative
from ldae_cli.studies.shares import Share, shares

POLL_SECONDS = 0.2  # how soon a finished child frees its slot
PLAIN_EVERY = 60.0  # off a terminal: the running children's progress, one line each, this often
PROGRESS = re.compile(r"step ([\d,]+)/([\d,]+)\b")
ETA = re.compile(r"\beta (\S+)")
METRIC_STEP = re.compile(r'\{"step": (\d+)')


@dataclass
class Child:
    """A run of the study and, once it started, its process, slot and log."""

    run: Run
    index: int
    state: str = "waiting"  # waiting, running, finished, failed, not run
    proc: subprocess.Popen | None = None
    slot: int = -1
    log: Path | None = None
    started: float = 0.0
    steps: int = 0  # the run's steps when it started
    was_finished: bool = False  # finished before it started: its child only checks it is this study's run
    why: str = ""  # a failure's one line
    progress: str = ""


def log_of(plan: Plan, run: Run) -> Path:
    return plan.out / "logs" / run.kind / f"{run.out.name}.log"


def last_error(log: Path | None) -> str:
    """The stage's own one-line error from a child's log (else its last line)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log else []
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "no output")


def progress_of(run: Run, log: Path) -> str:
    """step / total and ETA from the last progress line the child wrote (every training stage prints `step N/M ...
    eta T`), else the step of the last line of its metrics.jsonl (progress off)."""
    for path in (log, run.out / "metrics.jsonl"):
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                tail = f.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(tail):
            if path == log and (step := PROGRESS.search(line)):
                eta = ETA.search(line)
                return f"{step.group(1)}/{step.group(2)}" + (f", eta {eta.group(1)}" if eta else "")
            if path != log and (step := METRIC_STEP.match(line)):
                return f"{int(step.group(1)):,}/{run.steps:,}" if run.steps else f"{int(step.group(1)):,}"
    return ""


class Study:
    """The study's children on `jobs` slots; `after_seed(n)` once the first n seeds are complete."""

    def __init__(self, plan: Plan, nproc: int, jobs: int, after_seed: Callable[[int], None]):
        self.plan, self.nproc, self.after_seed = plan, nproc, after_seed
        self.slots: list[Share] = shares(jobs, nproc)
        self.free = list(range(jobs))
        self.timings = Timings(plan.out)
        self.children = [Child(run, i + 1) for i, run in enumerate(plan.runs())]
        self.by_run = {id(c.run): c for c in self.children}
        self.complete_seeds = 0
        self.printed = time.monotonic()

    def check_logs(self) -> None:
        """Before any run starts: where the logs go there is nothing yet or ldae's own folders and files, never a
        link, FIFO or device that a log would be written through."""
        for child in self.children:
            log = log_of(self.plan, child.run)
            check_own(log.parent.parent, folder=True)
            check_own(log.parent, folder=True)
            check_own(log)

    def pretrain_of(self, run: Run) -> Child | None:
        """The child whose checkpoint a probe reads (None for a pretrain)."""
        return self.by_run[id(run.pretrain)] if run.pretrain is not None else None

    def say(self, text: str) -> None:
        console.print(text, soft_wrap=True, markup=False)

    def start(self, child: Child) -> None:
        run, slot = child.run, self.free.pop(0)
        child.was_finished, child.steps = run.finished(), run.done_steps()
        how = (
            "finished: checked to be this study's run"
            if child.was_finished
            else f"continued from step {child.steps}"
            if child.steps
            else "new"
        )
        child.log = log_of(self.plan, run)
        child.log.parent.mkdir(parents=True, exist_ok=True)
        share = self.slots[slot]
        prefix = [sys.executable]
        if self.nproc > 1:  # --standalone: a free port each, so that runs at once never meet
            prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}"]
        env = {**os.environ, **share.env, "PYTHONUNBUFFERED": "1"}
        with os.fdopen(open_own(child.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a") as log:
            log.write(f"$ ldae {' '.join(run.command())}\n")
            log.flush()
            child.proc = subprocess.Popen(
                [*prefix, "-m", "ldae_cli", *run.command()], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        child.state, child.slot, child.started = "running", slot, time.time()
        total = len(self.children)
        self.say(
            f"study {child.index}/{total}: {run.kind} {run.label} ({how}) -> {run.out} [{share.text}; log "
            f"{relative(child.log, self.plan.out)}]"
        )

    def ended(self, child: Child, code: int) -> None:
        run = child.run
        self.free.append(child.slot)
        self.free.sort()
        if code == 0 and run.finished():
            child.state = "finished"
            if not child.was_finished:
                self.timings.add(self.plan, run, time.time() - child.started, run.done_steps() - child.steps)
            self.say(f"{run.kind} {run.label}: finished in {clock(time.time() - child.started)}")
        else:
            child.state = "failed"
            child.why = (
                f"exit {code}: {last_error(child.log)}"
                if code != 0
                else "stopped before its last step, e.g. at a time limit; run the same command again to continue it"
            )
            self.say(f"{run.kind} {run.label}: failed ({child.why}; log {child.log})")
        for other in self.children:  # a probe whose pretrain failed cannot run
            if other.state == "waiting" and (p := self.pretrain_of(other.run)) is not None and p.state == "failed":
                other.state, other.why = "not run", f"its pretrain {p.run.label} failed"
        self.publish()

    def publish(self) -> None:
        state = {id(c.run): c.state for c in self.children}
        complete = 0
        while complete < self.plan.seeds and all(state[id(run)] == "finished" for run in self.plan.seed_runs(complete)):
            complete += 1
        if complete > self.complete_seeds:
            self.complete_seeds = complete
            self.after_seed(complete)
            self.say(f"study {self.plan.study.name}: {estimate(self.plan, self.timings, at_once=len(self.slots))}")

    def ready(self) -> list[Child]:
        waiting = [c for c in self.children if c.state == "waiting"]
        return [c for c in waiting if (p := self.pretrain_of(c.run)) is None or p.state == "finished"]

    def step(self) -> bool:
        """Start what can start, reap what ended; False when nothing is left."""
        for child in self.children:
            if child.state == "running" and child.proc is not None and (code := child.proc.poll()) is not None:
                self.ended(child, code)
        for child in self.ready()[: len(self.free)]:
            self.start(child)
        for child in self.children:
            if child.state == "running" and child.log is not None:
                child.progress = progress_of(child.run, child.log)
        return any(c.state in ("waiting", "running") for c in self.children)

    def table(self) -> Table:
        table = Table(title=f"study {self.plan.study.name}, budget {self.plan.budget.name}")
        for name in ("#", "run", "state", "step / total, eta", "share"):
            table.add_column(name)
        style = {"finished": "green", "failed": "red", "not run": "red", "running": "bold"}
        for c in self.children:
            share = self.slots[c.slot].text if c.state == "running" else ""
            table.add_row(
                str(c.index),
                f"{c.run.kind} {c.run.label}",
                Text(c.state, style=style.get(c.state, "dim")),
                c.progress if c.state == "running" else "",
                share,
            )
        return table

    def plain(self) -> None:
        if time.monotonic() - self.printed < PLAIN_EVERY:
            return
        self.printed = time.monotonic()
        for c in self.children:
            if c.state == "running" and c.progress:
                self.say(f"{c.run.kind} {c.run.label}: running, step {c.progress}")

    def run_all(self) -> None:
        live = Live(self.table(), console=console, refresh_per_second=2) if console.is_terminal else None
        with live or contextlib.nullcontext():
            while self.step():
                if live is not None:
                    live.update(self.table())
                else:
                    self.plain()
                time.sleep(POLL_SECONDS)
            if live is not None:
                live.update(self.table())

    def stop(self, signal: KeyboardInterrupt) -> Interrupted:
        """Every running child saves and exits (SIGTERM passed on; Ctrl-C reached them from the terminal)."""
        running = [c for c in self.children if c.state == "running" and c.proc is not None]
        for child in running:
            if isinstance(signal, Terminated):
                child.proc.terminate()  # type: ignore[union-attr]
        for child in running:
            while True:
                try:
                    child.proc.wait()  # type: ignore[union-attr]
                    break
                except KeyboardInterrupt:
                    continue
        how = "SIGTERM" if isinstance(signal, Terminated) else "Ctrl-C"
        names = ", ".join(f"{c.run.kind} {c.run.label}" for c in running) or "no run"
        return Interrupted(
            f"study stopped by {how} during {names}; every finished run and what each stopped one saved are "
            "kept: run the same command again to continue",
            143 if isinstance(signal, Terminated) else 130,
        )

    def failures(self) -> str | None:
        failed = [c for c in self.children if c.state in ("failed", "not run")]
        if not failed:
            return None
        named = "; ".join(f"{c.run.kind} {c.run.label}: {c.why}" + (f" (log {c.log})" if c.log else "") for c in failed)
        return (
            f"{len(failed)} of {len(self.children)} runs did not finish: {named}; a study never replaces a run: "
            "fix the cause (or use another --out) and run the same command again (finished runs are kept)"
        )


def execute(plan: Plan, nproc: int, jobs: int, after_seed: Callable[[int], None]) -> None:
    """Every run of the study, `jobs` at once; raises naming each run that failed once the others are done."""
    study = Study(plan, nproc, jobs, after_seed)
    console.print(
        f"study {plan.study.name}, budget {plan.budget.name}, {plan.seeds} seed(s), {jobs} at once "
        f"({study.slots[0].text} each): {estimate(plan, study.timings, at_once=jobs)}",
        soft_wrap=True,
    )
    study.check_logs()
    try:
        study.run_all()
    except KeyboardInterrupt as signal:
        raise study.stop(signal) from None
    if (failed := study.failures()) is not None:
        raise LdaeError(failed)
