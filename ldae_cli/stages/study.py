"""`ldae study NAME`: one of the paper's comparisons (configs/study/NAME.yaml), every variant pretrained and
probed under one budget (configs/study/budget/*.yaml) for several seeds; see ldae_cli/study.py."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ldae_cli import study
from ldae_cli.config import BUNDLED_CONFIGS, find_config, load_config, parse_override
from ldae_cli.errors import LdaeError


def load(kind: str, name: str, cls: type):
    """A study or budget by path, or by name under configs/study/ (budgets under configs/study/budget/)."""
    where = "study" if kind == "study" else "study/budget"
    path = Path(name)
    if not path.is_file():
        try:
            path = find_config(f"{where}/{name}")
        except LdaeError:
            known = ", ".join(p.stem for p in sorted((BUNDLED_CONFIGS / where).glob("*.yaml")))
            raise LdaeError(f"{kind} '{name}' not found; give a YAML file or one of configs/{where}/: {known}") from None
    return load_config(cls, path)


def main(name: str, budget: str, seeds: int, out: str | None, data: str | None, source: str | None,
         overrides: list[str], nproc: int = 1) -> list[Path]:
    if seeds < 1 or nproc < 1:
        raise LdaeError(f"--seeds and --nproc must be at least 1, got {seeds} and {nproc}")
    spec = load("study", name, study.StudyConfig)
    plan_budget = load("budget", budget, study.BudgetConfig)
    extra = {"data.path": data, "data.source": source}
    extra = {k: v for k, v in extra.items() if v is not None}
    for text in overrides:  # --set for every pretrain run of the study
        keys, value = parse_override(text)
        extra[".".join(keys)] = value
    run_dir = Path(out) if out else Path("runs") / "study" / spec.name / plan_budget.name
    command = "ldae " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else f"ldae study {name}"
    return study.run_study(spec, plan_budget, seeds, run_dir, extra, nproc, command)
