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
from typing import Any, Callable

from ldae_cli.errors import Interrupted, LdaeError
from ldae_cli.runs.distributed import PREEMPTIBLE
from ldae_cli.runs.logs import console
from ldae_cli.runs.rundir import CHECKPOINT

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

    def __init__(self, argv: list[str], runner: Callable[[list[str]], None], must_finish: bool = False):
        check(argv)
        self.argv, self.runner, self.must_finish = list(argv), runner, must_finish

    def command(self) -> list[str]:
        return [*self.argv, "--continue"]

    def run(self) -> None:
        """The command once, in this process. With `must_finish` (a study's pretrain, which probes wait for with
        afterok) a run that stopped before its last step (run.stop_after_steps, run.time_limit_minutes) fails the
        job, so that no probe reads a partial checkpoint."""
        from ldae_cli.runs.checkpoint import read_metadata

        self.runner(self.command())
        out = output_of(self.argv)
        if self.must_finish and not (
            (out / CHECKPOINT).is_file() and read_metadata(out / CHECKPOINT)["extra"].get("finished")
        ):
            raise LdaeError(
                f"{out}: the run stopped before its last step; its job fails so that no probe waiting on it reads "
                "a partial checkpoint (run the same command again to continue it)"
            )

    def __call__(self) -> str:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ[PREEMPTIBLE] = "1"
        try:
            self.run()
        except Interrupted as exc:
            if exc.signal_name != "SIGUSR2":
                raise
            console.print(f"{exc}; requeueing", soft_wrap=True)
            signal.raise_signal(signal.SIGUSR2)  # the loop has saved: now submitit checkpoints and requeues
        return str(output_of(self.argv))

    def checkpoint(self):
        """Called by submitit on preemption or timeout: the same job again (it resumes by itself)."""
        import submitit

        return submitit.helpers.DelayedSubmission(LdaeJob(self.argv, self.runner, self.must_finish))


def submit(
    argv: list[str],
    runner: Callable[[list[str]], None],
    local: bool,
    nodes: int,
    gpus_per_node: int,
    options: JobOptions,
    folder: Path,
    dependency: str | None = None,
    local_flag: str = "--local",
    must_finish: bool = False,
):
    """Submit `ldae <argv>` as a job run by `runner`; returns the submitit job. `dependency`: SLURM's, e.g.
    afterok:123 (a local job has none: its caller waits instead); `must_finish`: see LdaeJob.run. A failed
    submission is one line, which names `local_flag`, the caller's option for submitit's local executor."""
    import submitit

    job = LdaeJob(argv, runner, must_finish)
    params: dict[str, Any] = dict(
        timeout_min=options.time_min, tasks_per_node=max(1, gpus_per_node), gpus_per_node=gpus_per_node
    )
    if not local:
        extra = dict(options.sbatch, **({"dependency": dependency} if dependency else {}))
        params.update(
            nodes=nodes,
            cpus_per_task=options.cpus_per_task,
            name=f"ldae-{argv[0]}-{output_of(argv).name}",
            slurm_partition=options.partition,
            slurm_signal_delay_s=120,
            slurm_additional_parameters=extra,
        )
    try:  # no SLURM on this machine (submitit finds no srun), or sbatch refused the job
        executor = (
            submitit.LocalExecutor(folder=str(folder))
            if local
            else submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        )
        executor.update_parameters(**params)
        return executor.submit(job)
    except (RuntimeError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LdaeError(f"could not submit the job ({text}); on a machine without SLURM use {local_flag}") from None


def error_line(text: str) -> str:
    """The stage's own one-line error out of a job's log or submitit's traceback (the LdaeError's message), else
    the text's last line (another exception, or SLURM's word on a job it cancelled); "" for no text."""
    errors = [line for line in text.splitlines() if "LdaeError: " in line]
    if errors:
        return errors[-1].split("LdaeError: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure(job) -> str:
    """Why a job ended without finishing its run: the error line of its first task's error log, else its state."""
    log = job.paths.stderr
    return error_line(log.read_text(errors="replace") if log.is_file() else "") or f"its job ended {job.state}"
