"""A study's runs as child processes of `ldae study` on this machine, up to `--jobs` at once, each with its own share
of the machine: its GPUs (CUDA_VISIBLE_DEVICES) or, on a CPU, its share of the cores (torch threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from ldae_cli.errors import Interrupted, LdaeError, Terminated
from ldae_cli.runs.logs import console
from ldae_cli.studies.runner import Plan, Run, Timings, estimate


@dataclass
class Share:
    """What one child of a study gets of this machine: its environment and the same in words."""

    env: dict[str, str]
    text: str


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or by index)."""
    import torch

    count = torch.cuda.device_count()
    names = [n.strip() for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()]
    return names[:count] if names else [str(i) for i in range(count)]


def shares(jobs: int, nproc: int) -> list[Share]:
    """One share per slot: `nproc` GPUs each where there are GPUs (refused when jobs x nproc exceed them), else the
    cores split so that jobs x threads <= cores (fewer threads where OMP_NUM_THREADS asks for fewer)."""
    gpus = visible_gpus()
    if gpus:
        if jobs * nproc > len(gpus):
            raise LdaeError(
                f"--jobs {jobs} x --nproc {nproc} needs {jobs * nproc} GPUs and this machine shows {len(gpus)} "
                f"({','.join(gpus)}); lower --jobs or --nproc"
            )
        return [
            Share({"CUDA_VISIBLE_DEVICES": ",".join(ids)}, f"GPU {','.join(ids)}")
            for ids in (gpus[slot * nproc : (slot + 1) * nproc] for slot in range(jobs))
        ]
    cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) > 0:
        threads = min(threads, int(asked))
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [Share(env, f"{threads} of {cores} CPU cores") for _ in range(jobs)]


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
