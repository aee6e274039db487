"""`ldae launch`: any training command as a SLURM job through submitit, requeued on preemption or timeout and
continued from its run directory (or as a local job, which behaves the same, for testing).

The job runs the command once per task (one task per GPU, every node), with torch.distributed's variables set
from SLURM's. SLURM warns a job before preempting it or at its time limit with SIGUSR2 (submitit asks for that):
the training loop takes it like Ctrl-C, finishes its step and saves, then submitit requeues the job. Every
attempt runs the command with `--continue`: the first starts the run, a requeued one continues it from its last
checkpoint (so preemption costs at most the step in flight), one preempted before its first checkpoint starts it
again, and a --out holding a different run is refused. Nothing is ever replaced on the user's behalf.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ldae_cli.errors import Interrupted, LdaeError
from ldae_cli.runs.distributed import PREEMPTIBLE
from ldae_cli.runs.logs import console

RESUMABLE = ("pretrain", "finetune", "train-tokenizer", "probe", "detect")


@dataclass
class JobOptions:
    """What every SLURM job gets beyond its GPUs: partition, time limit (minutes), cores per task, sbatch extras."""

    partition: str | None = None
    time_min: int = 60 * 24
    cpus_per_task: int = 10
    sbatch: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, partition: str | None, time_min: int, cpus_per_task: int, sbatch: list[str]) -> "JobOptions":
        """From the command line's --partition, --time, --cpus-per-task and --slurm KEY=VALUE items."""
        if min(time_min, cpus_per_task) < 1:
            raise LdaeError(f"--time and --cpus-per-task must be at least 1, got {time_min} and {cpus_per_task}")
        extra = {}
        for item in sbatch:
            if "=" not in item:
                raise LdaeError(f"--slurm '{item}': expected KEY=VALUE, e.g. --slurm account=myproject")
            key, value = item.split("=", 1)
            extra[key.strip()] = value
        return cls(partition, time_min, cpus_per_task, extra)


def output_of(argv: list[str]) -> Path:
    """The run directory the command names (--out DIR or --out=DIR)."""
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--out="):
            return Path(arg.split("=", 1)[1])
    raise LdaeError("ldae launch needs the command's --out DIR: a requeued job continues the run in that directory")


def check(argv: list[str]) -> None:
    if not argv or argv[0] not in RESUMABLE:
        raise LdaeError(
            f"ldae launch runs a training stage ({', '.join(RESUMABLE)}), e.g. `ldae launch -- pretrain "
            f"--config final.yaml --out runs/x`; got {' '.join(argv) or 'nothing'}"
        )
    for flag in ("--resume", "--continue"):
        if flag in argv:
            raise LdaeError(
                f"ldae launch starts a run and continues it itself after a requeue; give the command "
                f"without {flag} (its --out says where the run is)"
            )
    output_of(argv)


class LdaeJob:
    """What submitit runs in every task: the ldae command with --continue (start, or continue the same run), through
    `runner` (the CLI's in-process entry point; submitit pickles it by reference)."""

    def __init__(self, argv: list[str], runner: Callable[[list[str]], None]):
        check(argv)
        self.argv, self.runner = list(argv), runner

    def command(self) -> list[str]:
        return [*self.argv, "--continue"]

    def __call__(self) -> str:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ[PREEMPTIBLE] = "1"
        try:
            self.runner(self.command())
        except Interrupted as exc:
            if exc.signal_name != "SIGUSR2":
                raise
            console.print(f"{exc}; requeueing", soft_wrap=True)
            signal.raise_signal(signal.SIGUSR2)  # the loop has saved: now submitit checkpoints and requeues
        return str(output_of(self.argv))

    def checkpoint(self):
        """Called by submitit on preemption or timeout: the same job again (it resumes by itself)."""
        import submitit

        return submitit.helpers.DelayedSubmission(LdaeJob(self.argv, self.runner))


def submit(
    argv: list[str],
    runner: Callable[[list[str]], None],
    local: bool,
    nodes: int,
    gpus_per_node: int,
    options: JobOptions,
    folder: Path,
    dependency: str | None = None,
):
    """Submit `ldae <argv>` as a job run by `runner`; returns the submitit job. `dependency`: SLURM's, e.g.
    afterok:123 (a local job has none: its caller waits instead)."""
    import submitit

    job = LdaeJob(argv, runner)
    executor = (
        submitit.LocalExecutor(folder=str(folder))
        if local
        else submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    )
    params = dict(
        timeout_min=options.time_min,
        nodes=nodes,
        tasks_per_node=max(1, gpus_per_node),
        cpus_per_task=options.cpus_per_task,
        name=f"ldae-{argv[0]}-{output_of(argv).name}",
    )
    if local:
        params = {
            "timeout_min": options.time_min,
            "tasks_per_node": max(1, gpus_per_node),
            "gpus_per_node": gpus_per_node,
        }
    else:
        extra = dict(options.sbatch, **({"dependency": dependency} if dependency else {}))
        params.update(
            gpus_per_node=gpus_per_node,
            slurm_partition=options.partition,
            slurm_signal_delay_s=120,
            slurm_additional_parameters=extra,
        )
    executor.update_parameters(**params)
    return executor.submit(job)
