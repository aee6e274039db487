"""A study's runs as SLURM jobs through submitit (or submitit's local executor)."""

from __future__ import annotations

from typing import Callable

from ldae_cli.errors import LdaeError
from ldae_cli.runs.slurm import JobOptions
from ldae_cli.studies.runner import Plan


def execute(
    plan: Plan,
    launch: str,
    nproc: int,
    options: JobOptions,
    runner_fn: Callable[[list[str]], None] | None,
    publish: Callable[[int], None],
) -> bool:
    raise LdaeError(f"--launch {launch} is not available yet")
