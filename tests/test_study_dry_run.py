"""`ldae study --dry-run`: a study's plan (every run, its settings and seed, which are done) and a time measured on
this machine, with nothing written or trained."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import snapshot, study_args, unchanged, write_image_tree
from test_study import TOY_BUDGET, TOY_STUDY

from ldae_cli.config import config_from_dict
from ldae_cli.studies import cluster, runner
from ldae_cli.studies.spec import BudgetConfig, StudyConfig

ONE_VARIANT = {**TOY_STUDY, "variants": TOY_STUDY["variants"][:1], "baselines": []}


def toy_args(tmp_path, pattern_tree, study: dict) -> list[str]:
    return study_args(tmp_path, pattern_tree, study, TOY_BUDGET)


def printed_plan(run_main, args: list[str], *more: str) -> str:
    """What the dry run prints; it must leave every file as it was and add none."""
    root = Path(args[args.index("--out") + 1]).parent
    before, paths = snapshot(root), set(root.rglob("*"))
    res = run_main(*args, "--dry-run", *more)
    assert res.returncode == 0, res.stderr
    unchanged(before)
    assert set(root.rglob("*")) == paths  # no file or folder new either
    return res.stdout


def dry_run(run_main, args: list[str], *more: str) -> tuple[list[str], str]:
    """The plan's run lines and its time line (nothing written)."""
    lines = printed_plan(run_main, args, *more).splitlines()
    runs = [line for line in lines if re.match(r"\d+/\d+ ", line)]
    return runs, next(line for line in lines if line.startswith("time: "))


@pytest.mark.parametrize("seeds, pretrains, probes", [(1, 2, 3), (2, 4, 6)])
def test_the_plan_lists_every_run_with_its_settings_and_a_time_measured_here(
    seeds, pretrains, probes, run_main, tmp_path, pattern_tree
):
    args = toy_args(tmp_path, pattern_tree, TOY_STUDY)  # two variants and the random-init baseline
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
    assert "budget toy's 100 img/s" not in when  # the budget's figure (a speed timed now may read 1,100 img/s)


def test_the_plan_marks_the_runs_a_study_already_ran(run_main, tmp_path, pattern_tree):
    args = toy_args(tmp_path, pattern_tree, ONE_VARIANT)
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
    runs, when = dry_run(run_main, toy_args(tmp_path, pattern_tree, ONE_VARIANT), "--set", "data.image_size=null")
    assert len(runs) == 2 and when.startswith("time: 1 pretrain run(s) and 1 probe(s) to go of 1 and 1")


def test_the_wall_time_runs_the_study_in_its_order_on_its_slots_a_probe_after_its_pretrain(tmp_path, pattern_tree):
    """Three seeds of a pretrain (3 min) and its probe (1 min): one slot runs them one after another; two run the
    first two pretrains, then the probes that waited for them ahead of the third pretrain (the study's order); with
    room for all, the time is one pretrain and its probe."""
    after = [None, 0, None, 2, None, 4]
    seconds = [180.0, 60.0] * 3
    assert runner.schedule(seconds, after, 1) == 720
    assert runner.schedule(seconds, after, 2) == 480
    assert runner.schedule(seconds, after, None) == 240
    assert runner.schedule([], [], 2) == 0

    data = {"data.source": "imagefolder", "data.path": str(pattern_tree)}
    plan = runner.make_plan(
        config_from_dict(StudyConfig, ONE_VARIANT), config_from_dict(BudgetConfig, TOY_BUDGET), 3, tmp_path, data
    )
    timings = runner.Timings(plan.out)
    timings.add(plan, plan.rows[0].pretrains[0], 180.0, 3)  # measured: 60 s a step, 3 steps a pretrain
    timings.add(plan, plan.rows[0].probes[0], 60.0, 0)
    how = "(pretrains at the speed this study measured; probes 1.0 min as measured)"
    to_go = "3 pretrain run(s) and 3 probe(s) to go of 3 and 3"
    assert runner.estimate(plan, timings) == f"{to_go}; about 12 min {how}"
    assert (
        runner.estimate(plan, timings, at_once=2)
        == f"{to_go}; about 8 min with 2 at once, 12 min one after another {how}"
    )
    assert (
        runner.estimate(plan, timings, at_once=None)
        == f"{to_go}; about 4 min with every run at once, 12 min one after another {how}"
    )


def test_jobs_share_the_cpu_cores_and_the_plan_says_what_each_run_gets(run_main, tmp_path, pattern_tree, monkeypatch):
    """--jobs 2 on a 2-core machine: each run gets one core, and the steps are timed on one thread (the child's);
    three 10-minute probes on two slots take 20 minutes, 30 one after another."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    threads, set_threads = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (threads.append(n), set_threads(n)))
    before = torch.get_num_threads()
    args = toy_args(tmp_path, pattern_tree, TOY_STUDY)
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump({**TOY_BUDGET, "probe_minutes": 10}))
    res = run_main(*args, "--jobs", "2", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "out").exists()
    assert ": 5 runs, 0 finished, 2 at once (--dry-run: nothing is written, trained or submitted)" in res.stdout
    assert "\neach run: 1 of 2 CPU cores\n" in res.stdout
    assert threads == [1, before] and torch.get_num_threads() == before
    when = next(line for line in res.stdout.splitlines() if line.startswith("time: "))
    assert "; about 20 min with 2 at once, 30 min one after another (" in when
    assert when.endswith(
        "; 2 runs at once share this machine's CPU cores and memory, so speeds measured with one run on it are "
        "optimistic"
    )


def cifar10_study(tmp_path, *more: str) -> list[str]:
    """pixel-vs-latent at the gpu budget on CIFAR-10 (its size is known without the data)."""
    return ["study", "pixel-vs-latent", "--budget", "gpu", "--source", "cifar10", "--out", str(tmp_path / "out"), *more]


def test_eight_jobs_on_an_eight_gpu_node_take_a_gpu_each_and_nine_are_refused(run_main, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    printed = printed_plan(run_main, cifar10_study(tmp_path, "--seeds", "3", "--jobs", "8"))
    assert not (tmp_path / "out").exists()
    slots = ", ".join(f"GPU {i}" for i in range(8))
    assert ": 18 runs, 0 finished, 8 at once (" in printed
    assert f"\nslots (each run takes the first free one): {slots}\n" in printed
    when = printed.splitlines()[-1]
    # bf16 on a GPU is not timed on this CPU: the budget's figure, and no word on shared cores
    assert when.startswith("time: 6 pretrain run(s) and 12 probe(s) to go of 6 and 12; about ")
    assert "with 8 at once, " in when and "pretrains at budget gpu's 12000 img/s" in when
    assert when.endswith("probes 0.4 min, the budget's figure)")
    refused = run_main(*cifar10_study(tmp_path, "--jobs", "9"), "--dry-run")
    assert refused.returncode == 1 and not (tmp_path / "out").exists()
    assert refused.stderr.strip().splitlines() == [
        "error: --jobs 9 x --nproc 1 needs 9 GPUs and this machine shows 8 (0,1,2,3,4,5,6,7); lower --jobs or --nproc"
    ]


def test_a_slurm_plan_at_the_paper_budget_lists_its_jobs_and_submits_nothing(run_main, tmp_path, monkeypatch):
    """256-px images (the paper budget never upsamples); pretrains of 200,000 steps of 8 images at the budget's
    7344 img/s (about 4 minutes) are over a 1-minute limit: requeued three times. Every job at once: the time is a
    pretrain and its probe's (60 minutes, the budget's)."""
    monkeypatch.setattr(cluster, "execute", lambda *a, **k: pytest.fail("a dry run submits nothing"))
    photos = write_image_tree(tmp_path / "photos", per_class=4, size=(256, 256))
    args = ["study", "pixel-vs-latent", "--budget", "paper", "--source", "imagefolder", "--data", str(photos)]
    args += ["--out", str(tmp_path / "out"), "--set", "optim.batch_size=8", "--set", "optim.epochs=200000"]
    more = ("--nproc", "8", "--launch", "slurm", "--partition", "gpu", "--time", "1")
    started = time.perf_counter()
    printed = printed_plan(run_main, args, *more)
    assert time.perf_counter() - started < 30 and not (tmp_path / "out").exists()
    assert ": 6 runs, 0 finished, every job at once, as SLURM allows (" in printed
    assert (
        "\none job per pretrain with 8 GPU(s) and 10 CPU cores per task, partition gpu, time limit 1 min; one job per "
        "probe with 1 GPU, held until its pretrain succeeds (afterok)\n"
    ) in printed
    when = printed.splitlines()[-1]
    pretrains = [line for line in printed.splitlines() if re.match(r"\d/6 pretrain ", line)]
    assert len(pretrains) == 2 and all(
        line.endswith("; about 4 min, over --time 1: requeued about 3 times at its time limit") for line in pretrains
    )
    assert when.startswith(
        "time: 2 pretrain run(s) and 4 probe(s) to go of 2 and 4; about 64 min with every run at once, "
    )
    assert "pretrains at budget paper's 7344 img/s" in when and when.endswith("; SLURM's queue waits come on top")
