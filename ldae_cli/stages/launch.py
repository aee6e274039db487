"""`ldae launch`: submit a training command as a SLURM (or local) job; see ldae_cli/runs/slurm.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ldae_cli.errors import LdaeError
from ldae_cli.runs import slurm
from ldae_cli.runs.logs import console


def main(
    argv: list[str],
    runner: Callable[[list[str]], None],
    local: bool,
    nodes: int,
    gpus_per_node: int,
    cpus_per_task: int,
    partition: str | None,
    time_min: int,
    folder: str,
    sbatch: list[str],
    wait: bool,
) -> str:
    """Submit `ldae <argv>`; every task of the job calls `runner(argv)` (the CLI's in-process entry, by reference)."""
    argv = argv[1:] if argv[:1] == ["--"] else argv
    slurm.check(argv)
    if nodes < 1 or gpus_per_node < 0:
        raise LdaeError("--nodes must be at least 1, --gpus-per-node at least 0")
    options = slurm.JobOptions.parse(partition, time_min, cpus_per_task, sbatch)
    job = slurm.submit(argv, runner, local, nodes, gpus_per_node, options, Path(folder))
    console.print(f"submitted job {job.job_id}: ldae {' '.join(argv)}; logs in {job.paths.folder}")
    if wait:
        console.print(f"job {job.job_id} finished; its run is {result(job, argv[0])}")
    return job.job_id


def result(job, stage: str) -> str:
    """The job's result; a failure is the stage's own one-line error (submitit wraps it in its traceback)."""
    from submitit.core.utils import UncompletedJobError

    try:
        return job.result()
    except UncompletedJobError as exc:
        reason = slurm.error_line(str(exc)) or "?"
        raise LdaeError(f"job {job.job_id} ({stage}) failed: {reason} (log: {job.paths.stderr})") from None
