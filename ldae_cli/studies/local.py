"""A study's runs as child processes of `ldae study` on this machine, up to `--jobs` at once, each with its own share
of the machine: its GPUs (CUDA_VISIBLE_DEVICES) or, on a CPU, its share of the cores (torch threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ldae_cli.errors import Interrupted, LdaeError, Terminated
from ldae_cli.runs.logs import console
from ldae_cli.studies.runner import Plan, Run, Timings, estimate


def wait_for(proc: subprocess.Popen) -> tuple[int, KeyboardInterrupt | None]:
    """The child's exit code, and the Ctrl-C or SIGTERM that came meanwhile, if one did. Ctrl-C reaches the child
    from the terminal, SIGTERM is passed on: it saves and stops, and the study stops after it whatever it exits
    with (a child may finish its last step and exit 0 after the signal)."""
    stop = None
    while True:
        try:
            return proc.wait(), stop
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated) and stop is None:
                proc.terminate()
            stop = stop or exc


def launch(run: Run, nproc: int) -> None:
    """One `ldae` child, its output on this terminal; a failure or a stop ends the study with one line."""
    prefix = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    )
    code, stop = wait_for(subprocess.Popen([*prefix, "-m", "ldae_cli", *run.command()], env=os.environ.copy()))
    if stop is not None:
        how = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        raise Interrupted(
            f"study stopped by {how} during {run.kind} {run.label}; every finished run and what that "
            "one saved are kept: run the same command again to continue",
            143 if isinstance(stop, Terminated) else 130,
        )
    if code != 0:
        raise LdaeError(
            f"{run.kind} {run.label} failed (exit {code}, its error is above; its run is {run.out}); a "
            "study never replaces a run: fix the cause, or use another --out, and run the same command "
            "again (finished runs are kept)"
        )
    if not run.finished():
        raise LdaeError(
            f"{run.kind} {run.label} stopped before its last step ({run.out}), e.g. at a time limit; run "
            "the same command again to continue it"
        )


def execute(plan: Plan, nproc: int, jobs: int, after_seed) -> None:
    """Every run, seed by seed; `after_seed(n)` once the first n seeds are complete."""
    timings = Timings(plan.out)
    console.print(
        f"study {plan.study.name}, budget {plan.budget.name}, {plan.seeds} seed(s): {estimate(plan, timings)}",
        soft_wrap=True,
    )
    count = sum(len(plan.seed_runs(seed)) for seed in range(plan.seeds))
    index = 0
    for seed in range(plan.seeds):
        for run in plan.seed_runs(seed):
            index += 1
            finished, steps = run.finished(), run.done_steps()
            state = (
                "finished: checked to be this study's run"
                if finished
                else f"continued from step {steps}"
                if steps
                else "new"
            )
            console.print(
                f"[bold]study {index}/{count}[/bold]: {run.kind} {run.label} ({state}) -> {run.out}", soft_wrap=True
            )
            started = time.time()
            launch(run, nproc)
            if not finished:
                timings.add(plan, run, time.time() - started, run.done_steps() - steps)
                console.print(f"study {plan.study.name}: {estimate(plan, timings)}", soft_wrap=True)
        after_seed(seed + 1)
