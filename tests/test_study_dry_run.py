"""`ldae study --dry-run`: a study's plan (every run, its settings and seed, which are done) and a time measured on
this machine, with nothing written or trained."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from helpers import snapshot, unchanged
from test_study import TOY_BUDGET, TOY_STUDY

ONE_VARIANT = {**TOY_STUDY, "variants": TOY_STUDY["variants"][:1], "baselines": []}


def study_args(tmp_path, pattern_tree, study: dict) -> list[str]:
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump(TOY_BUDGET))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return [
        "study",
        str(tmp_path / "study.yaml"),
        "--budget",
        str(tmp_path / "budget.yaml"),
        "--out",
        str(tmp_path / "out"),
        "--source",
        "imagefolder",
        "--data",
        str(pattern_tree),
    ]


def dry_run(run_main, args: list[str], *more: str) -> tuple[list[str], str]:
    """The plan's run lines and its time line; the dry run must leave every file as it was and add none."""
    root = Path(args[args.index("--out") + 1]).parent
    before, paths = snapshot(root), set(root.rglob("*"))
    res = run_main(*args, "--dry-run", *more)
    assert res.returncode == 0, res.stderr
    unchanged(before)
    assert set(root.rglob("*")) == paths  # no file or folder new either
    lines = res.stdout.splitlines()
    runs = [line for line in lines if re.match(r"\d+/\d+ ", line)]
    return runs, next(line for line in lines if line.startswith("time: "))


@pytest.mark.parametrize("seeds, pretrains, probes", [(1, 2, 3), (2, 4, 6)])
def test_the_plan_lists_every_run_with_its_settings_and_a_time_measured_here(
    seeds, pretrains, probes, run_main, tmp_path, pattern_tree
):
    args = study_args(tmp_path, pattern_tree, TOY_STUDY)  # two variants and the random-init baseline
    started = time.perf_counter()
    runs, when = dry_run(run_main, args, "--seeds", str(seeds))
    assert time.perf_counter() - started < 30  # seconds, not a training run
    assert not (tmp_path / "out").exists()
    assert len(runs) == pretrains + probes and all(
        line.startswith(f"{i}/{len(runs)} ") for i, line in enumerate(runs, 1)
    )
    assert (
        runs[0] == f"1/{len(runs)} pretrain l-DAE, seed 0: to run (final.yaml, 3 steps of 8 images) -> "
        "pretrain/l-dae-s0"
    )
    assert runs[1].startswith(f"2/{len(runs)} pretrain pixel DAE, seed 0: to run (final.yaml, ")
    assert 'tokenizer.kind="pixel"' in runs[1] and "tokenizer.dim=null" in runs[1]
    assert runs[4].endswith(
        "probe random init (same network), seed 0: to run (of pretrain/l-dae-s0, --random-init) "
        "-> probe/random-init-same-network-s0"
    )
    assert when.startswith(f"time: {pretrains} pretrain run(s) and {probes} probe(s) to go of {pretrains} and {probes}")
    # the speed is measured here, not the budget's figure, and the estimate says what it leaves out
    assert re.search(
        r"pretrains at [\d,]+ img/s per device \(\d+ synthetic images on cpu\), the training step "
        r"alone, timed now: data loading, the PCA fit, online probes, checkpoints and process starts "
        r"come on top; probes 0.1 min, the budget's figure\)$",
        when,
    ), when
    assert "100 img/s" not in when


def test_the_plan_marks_the_runs_a_study_already_ran(run_main, tmp_path, pattern_tree):
    args = study_args(tmp_path, pattern_tree, ONE_VARIANT)
    stopped = run_main(*args, "--set", "run.stop_after_steps=1")  # its pretrain stops at step 1
    assert stopped.returncode == 1 and "stopped before its last step" in stopped.stderr
    runs, _ = dry_run(run_main, args, "--set", "run.stop_after_steps=1")
    assert runs == [
        "1/2 pretrain l-DAE, seed 0: to continue from step 1 (final.yaml, 3 steps of 8 images) -> pretrain/l-dae-s0",
        "2/2 probe l-DAE, seed 0: to run (of pretrain/l-dae-s0) -> probe/l-dae-s0",
    ]

    assert run_main(*args).returncode == 0
    runs, when = dry_run(run_main, args, "--seeds", "2")  # seed 0 is done, seed 1 is to run
    assert [line.split(": ")[1].split(" (")[0] for line in runs] == ["done", "done", "to run", "to run"]
    assert when.startswith("time: 1 pretrain run(s) and 1 probe(s) to go of 2 and 2")
    assert "pretrains at the speed this study measured; probes" in when and "min as measured" in when


def test_a_budget_that_leaves_the_image_size_to_the_data_plans_at_the_size_its_runs_settle(
    run_main, tmp_path, pattern_tree
):
    """data.image_size null (the paper budget's way): each run will read the images at their own 32 pixels, and the
    plan is made, and timed, at that size."""
    runs, when = dry_run(run_main, study_args(tmp_path, pattern_tree, ONE_VARIANT), "--set", "data.image_size=null")
    assert len(runs) == 2 and when.startswith("time: 1 pretrain run(s) and 1 probe(s) to go of 1 and 1")
