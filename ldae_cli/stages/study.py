"""`ldae study NAME`: one of the paper's comparisons (configs/study/NAME.yaml), every variant pretrained and
probed under one budget (configs/study/budget/*.yaml) for several seeds; see ldae_cli/studies/."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from ldae_cli.config import BUNDLED_CONFIGS, find_config, load_config, parse_override
from ldae_cli.errors import LdaeError
from ldae_cli.runs.logs import console
from ldae_cli.runs.rundir import RUNS
from ldae_cli.runs.slurm import JobOptions
from ldae_cli.studies import cluster, local, pages, results, runner
from ldae_cli.studies.spec import BudgetConfig, StudyConfig


def load(kind: str, name: str, cls: type):
    """A study or budget by path, or by name under configs/study/ (budgets under configs/study/budget/)."""
    where = "study" if kind == "study" else "study/budget"
    path = Path(name)
    if not path.is_file():
        try:
            path = find_config(f"{where}/{name}")
        except LdaeError:
            known = ", ".join(p.stem for p in sorted((BUNDLED_CONFIGS / where).glob("*.yaml")))
            raise LdaeError(
                f"{kind} '{name}' not found; give a YAML file or one of configs/{where}/: {known}"
            ) from None
    return load_config(cls, path)


def reproduce(argv: list[str]) -> str:
    """The command line that made a study, without --out and --pretrains: where it ran (and which runs it shared
    with another study, identical by their settings and seed) is no part of what it shows."""
    where = ("--out", "--pretrains")
    kept = [
        arg
        for i, arg in enumerate(argv)
        if not (arg in where or arg.startswith(tuple(f"{w}=" for w in where)) or (i and argv[i - 1] in where))
    ]
    return "ldae " + " ".join(shlex.quote(a) for a in kept)


def main(
    name: str,
    budget: str,
    seeds: int,
    out: str | None,
    data: str | None,
    source: str | None,
    overrides: list[str],
    nproc: int = 1,
    pretrains: str | None = None,
    dry_run: bool = False,
    jobs: int = 1,
    launch: str | None = None,
    partition: str | None = None,
    time_min: int = 60 * 24,
    cpus_per_task: int = 10,
    sbatch: tuple[str, ...] | list[str] = (),
    runner_fn: Callable[[list[str]], None] | None = None,
) -> list[Path]:
    if seeds < 1 or nproc < 1 or jobs < 1:
        raise LdaeError(f"--seeds, --nproc and --jobs must be at least 1, got {seeds}, {nproc} and {jobs}")
    if launch not in (None, "slurm", "local"):
        raise LdaeError(f"--launch {launch}: expected slurm or local (default: child processes of this command)")
    if launch is not None and jobs != 1:
        raise LdaeError(
            f"--jobs {jobs} sets how many child processes run at once on this machine; with --launch {launch} every "
            "run is a job of its own, started as soon as it may: drop --jobs"
        )
    options = JobOptions.parse(partition, time_min, cpus_per_task, list(sbatch))
    spec = load("study", name, StudyConfig)
    plan_budget = load("budget", budget, BudgetConfig)
    extra = {"data.path": data, "data.source": source}
    extra = {k: v for k, v in extra.items() if v is not None}
    for text in overrides:  # --set for every pretrain run of the study
        keys, value = parse_override(text)
        extra[".".join(keys)] = value
    run_dir = Path(out) if out else RUNS / "study" / spec.name / plan_budget.name
    command = reproduce(sys.argv[1:]) if sys.argv[1:] else f"ldae study {name}"
    plan = runner.make_plan(
        spec, plan_budget, seeds, run_dir.resolve(), extra, Path(pretrains).resolve() if pretrains else None
    )
    if dry_run:
        runner.dry_run(plan, nproc, jobs, launch, options)
        return []
    written: list[Path] = []

    def publish(complete: int) -> None:  # the page of the seeds complete so far, rewritten as more complete
        written[:] = pages.write(results.collect(plan, complete, dataclasses.asdict(plan_budget), command), run_dir)

    started = time.time()
    if launch is None:
        local.execute(plan, nproc, jobs, publish)
    elif not cluster.execute(plan, launch, nproc, options, runner_fn, publish):
        return []  # submitted or still running on the cluster: the same command again shows where it stands
    console.print(
        f"study {spec.name} done in {(time.time() - started) / 60:.1f} min; wrote {', '.join(str(w) for w in written)}"
    )
    console.print((run_dir / "results.md").read_text())
    return written
