"""A study's runs as jobs through submitit: `--launch slurm` submits them to SLURM and returns, `--launch local` runs
them with submitit's local executor on this machine and waits (for tests and machines without SLURM).

One job per pretrain not finished (--nproc GPUs, one task each), one per probe (1 GPU) held until its pretrain has
finished: on SLURM by the dependency afterok:<the pretrain's job>, locally by being submitted only then. Every job
runs its command with --continue and is requeued on preemption or at its time limit, as `ldae launch`'s are
(runs/slurm.py). The study's jobs.json keeps each run's jobs, newest last, so that the same command again never
submits a run twice: a finished run (its directory says so) is skipped, one whose job is pending or running is left
alone, and one whose last job ended without finishing it is named with its error and log and submitted again. A
failure makes the command that learns of it exit non-zero: on SLURM the next one, locally the one that waited.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.table import Table
from rich.text import Text

from ldae_cli.errors import Interrupted, LdaeError, Terminated
from ldae_cli.runs import slurm
from ldae_cli.runs.logs import console
from ldae_cli.runs.rundir import write_atomically
from ldae_cli.runs.slurm import JobOptions
from ldae_cli.studies.runner import Plan, Run, Timings, relative

JOBS = "jobs.json"
FOLDER = "slurm/%j"  # submitit's folder under the study's: each job's script, pickles and logs


@dataclass
class Entry:
    """Where one run stands: its newest job (submitit's; None before the first), the state in words, and why its
    last job ended without finishing it."""

    run: Run
    job: Any = None
    state: str = "to submit"
    error: str = ""
    started: tuple[float, int] = (0.0, 0)  # when its job was submitted, and the run's steps then

    def needs_job(self) -> bool:
        return self.state != "finished" and (self.job is None or bool(self.error))


class Ledger:
    """jobs.json: each run's folder (relative to the study's) -> its kind and its jobs (id and launcher), newest
    last; written after every submission, so that a command stopped half-way still knows what it submitted."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / JOBS
        self.runs: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def last(self, run: Run):
        """The run's newest job as submitit sees it (SLURM's state asked of sacct), or None."""
        import submitit

        jobs = self.runs.get(relative(run.out, self.out), {}).get("jobs", [])
        if not jobs:
            return None
        kind = submitit.SlurmJob if jobs[-1]["launch"] == "slurm" else submitit.LocalJob
        return kind(folder=str(self.out / FOLDER), job_id=jobs[-1]["id"])

    def add(self, run: Run, launch: str, job_id: str) -> None:
        entry = self.runs.setdefault(relative(run.out, self.out), {"kind": run.kind, "jobs": []})
        entry["jobs"].append({"id": job_id, "launch": launch})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, (json.dumps(self.runs, indent=1) + "\n").encode())


def look(ledger: Ledger, runs: list[Run]) -> dict[Path, Entry]:
    """Each run: finished (from its directory), else its last job's state; a job that has ended without finishing
    its run is a failure, with the error line of its log."""
    entries = {run.out: Entry(run, ledger.last(run)) for run in runs}  # every job known before sacct is asked, once
    for entry in entries.values():
        if entry.run.finished():
            entry.state = "finished"
        elif entry.job is not None:
            ended = entry.job.done()
            entry.state = entry.job.state
            entry.error = slurm.failure(entry.job) if ended else ""
    return entries


def release(entries: dict[Path, Entry], pretrain_of: dict[Path, Path]) -> None:
    """A probe's job held for a pretrain job that failed can never start (afterok): it is cancelled, and the probe
    submitted again after the pretrain's new job."""
    for entry in entries.values():
        pretrain = entries[pretrain_of[entry.run.out]] if entry.run.kind == "probe" else None
        if pretrain is not None and pretrain.error and entry.job is not None and entry.state != "finished":
            if not entry.error:
                entry.job.cancel(check=False)
                console.print(
                    f"cancelled job {entry.job.job_id} ({entry.run.kind} {entry.run.label}): it waited for a "
                    "pretrain job that failed",
                    markup=False,
                )
            entry.job = None


def show(plan: Plan, entries: dict[Path, Entry]) -> None:
    """Every run's state: a table on a terminal, a line each otherwise."""
    rows = [
        (
            e.run.label,
            e.run.kind,
            e.state,
            e.job.job_id if e.job is not None else "",
            relative(e.job.paths.stdout, plan.out) if e.job is not None else "",
        )
        for e in entries.values()
    ]
    if console.is_terminal:
        table = Table("run", "kind", "state", "job", "log", title=f"study {plan.study.name} in {plan.out}")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
        return
    for label, kind, state, job, log in rows:
        console.print(f"{kind} {label}: {state}" + (f" (job {job}, log {log})" if job else ""), markup=False)


def failure_line(entry: Entry) -> str:
    return f"{entry.run.kind} {entry.run.label}: {entry.error} (log: {entry.job.paths.stderr})"


def stop(running: list[Entry], exc: KeyboardInterrupt) -> None:
    """Ctrl-C reached the local jobs from the terminal; SIGTERM is passed on to each job's controller (its id), which
    passes it to its tasks. Each saves and stops; the study stops once they have."""
    if isinstance(exc, Terminated):
        for entry in running:
            os.kill(int(entry.job.job_id), signal.SIGTERM)
    for entry in running:
        entry.job.wait()
    how, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
    raise Interrupted(
        f"study stopped by {how}; every finished run and what the running ones saved are kept: run the same "
        "command again to continue",
        code,
    ) from None


def wait_local(
    plan: Plan, entries: dict[Path, Entry], pretrain_of: dict[Path, Path], submit: Callable[[Entry], None]
) -> None:
    """Until every local job has ended, each probe submitted once its pretrain has finished (never, when the
    pretrain failed); a job that ends without finishing its run is a failure, named at once. A finished run's
    time, submission to end, goes to the study's timings (its estimate, its page)."""
    timings = Timings(plan.out)
    running = [e for e in entries.values() if e.state == "submitted"]
    held = [e for e in entries.values() if e.run.kind == "probe" and e.needs_job()]
    try:
        while True:
            for entry in list(held):
                pretrain = entries[pretrain_of[entry.run.out]]
                if pretrain.state in ("finished", "failed"):
                    held.remove(entry)
                    if pretrain.state == "failed":
                        entry.state = "not run: its pretrain failed"
                        continue
                    submit(entry)
                    running.append(entry)
            if not running:
                return
            time.sleep(0.5)
            for entry in [e for e in running if e.job.done()]:
                running.remove(entry)
                entry.state = "finished" if entry.run.finished() else "failed"
                entry.error = "" if entry.state == "finished" else slurm.failure(entry.job)
                if not entry.error:
                    since, steps = entry.started
                    timings.add(plan, entry.run, time.time() - since, entry.run.done_steps() - steps)
                what = failure_line(entry) if entry.error else f"{entry.run.kind} {entry.run.label}"
                console.print(f"{entry.state}: {what}", markup=False)
    except KeyboardInterrupt as exc:
        stop(running, exc)


def execute(
    plan: Plan,
    launch: str,
    nproc: int,
    options: JobOptions,
    runner_fn: Callable[[list[str]], None] | None,
    publish: Callable[[int], None],
) -> bool:
    """Submit what is left to run; True once every run has finished and the pages are written (`publish`), False
    while jobs are pending or running on SLURM (the same command again shows them)."""
    if runner_fn is None:
        raise LdaeError(f"--launch {launch} runs each job through the ldae command line: use `ldae study --launch`")
    ledger = Ledger(plan.out)
    entries = look(ledger, plan.runs())
    pretrain_of = {run.out: run.pretrain.out for run in plan.runs() if run.pretrain is not None}
    failed = [failure_line(e) for e in entries.values() if e.error]  # jobs that ended since the last command
    for line in failed:
        console.print(f"failed: {line}; submitted again", markup=False)
    release(entries, pretrain_of)

    def submit(entry: Entry) -> None:
        run = entry.run
        pretrain = entries[pretrain_of[run.out]] if run.kind == "probe" else None
        after = pretrain.job.job_id if pretrain is not None and pretrain.state != "finished" else None
        job = slurm.submit(
            [*run.args, "--out", str(run.out)],
            runner_fn,
            launch == "local",
            1,
            nproc if run.kind == "pretrain" else 1,
            options,
            plan.out / FOLDER,
            None if after is None or launch == "local" else f"afterok:{after}",
            local_flag="--launch local",
            must_finish=run.kind == "pretrain",
        )
        ledger.add(run, launch, job.job_id)
        entry.job, entry.state, entry.error, entry.started = job, "submitted", "", (time.time(), run.done_steps())
        console.print(f"submitted job {job.job_id}: {run.kind} {run.label}", markup=False)

    for entry in [e for e in entries.values() if e.run.kind == "pretrain" and e.needs_job()]:
        submit(entry)
    if launch == "local":
        wait_local(plan, entries, pretrain_of, submit)
        failed = [failure_line(e) for e in entries.values() if e.error]  # this command's (the earlier were shown)
    else:
        for entry in [e for e in entries.values() if e.run.kind == "probe" and e.needs_job()]:
            submit(entry)
    show(plan, entries)
    return conclude(plan, entries, failed, launch, publish)


def conclude(
    plan: Plan, entries: dict[Path, Entry], failed: list[str], launch: str, publish: Callable[[int], None]
) -> bool:
    """The pages once every run has finished; else where the runs stand; failures last, as the command's error."""
    done = [e for e in entries.values() if e.state == "finished"]
    if failed:
        then = (
            "submitted again: the same command again shows where they stand"
            if launch == "slurm"
            else "fix the cause and run the same command again (finished runs are kept, failed ones run again)"
        )
        raise LdaeError(
            f"{len(failed)} run(s) failed ({len(done)} of {len(entries)} runs finished): {'; '.join(failed)}; {then}"
        )
    if len(done) == len(entries):
        publish(plan.seeds)
        return True
    console.print(
        f"{len(done)} of {len(entries)} runs finished, the others' jobs submitted, pending or running (logs in "
        f"{plan.out / 'slurm'}); run the same command again to see where they stand: once every run has finished "
        "it writes the pages",
        soft_wrap=True,
    )
    return False
