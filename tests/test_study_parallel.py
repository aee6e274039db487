"""`ldae study --jobs N`: runs at once on this machine, each child with its share and its log. The same study run
one after another and two at once gives the same numbers from bit-identical checkpoints; a failing child is named
while the others finish; SIGTERM makes every running child save, and the study continues them on the next call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import study_args
from safetensors.torch import load_file
from test_study import TOY_BUDGET, TOY_STUDY

from ldae_cli.runs.checkpoint import read_metadata

TWO_ROWS = {**TOY_STUDY, "baselines": []}  # two pretrains and two probes a seed


def numbers(out: Path) -> list:
    results = json.loads((out / "results.json").read_text())
    return [(row["name"], row["linear"], row["knn"]) for row in results["rows"]]


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def test_one_after_another_two_at_once_and_as_jobs_give_the_same_numbers(run_main, tmp_path, pattern_tree, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same torch threads per run every way (2 cores / 2 jobs)
    serial = run_main(*study_args(tmp_path, pattern_tree, TWO_ROWS, TOY_BUDGET, "serial"))
    assert serial.returncode == 0, serial.stderr
    both = run_main(*study_args(tmp_path, pattern_tree, TWO_ROWS, TOY_BUDGET, "jobs2"), "--jobs", "2")
    assert both.returncode == 0, both.stderr
    assert "2 at once (1 of" in both.stdout and "CPU cores each)" in both.stdout
    jobs = run_main(*study_args(tmp_path, pattern_tree, TWO_ROWS, TOY_BUDGET, "local"), "--launch", "local")
    assert jobs.returncode == 0, jobs.stderr
    assert numbers(tmp_path / "serial") == numbers(tmp_path / "jobs2") == numbers(tmp_path / "local")
    for run in ("pretrain/l-dae-s0", "pretrain/pixel-dae-s0", "probe/l-dae-s0", "probe/pixel-dae-s0"):
        for other in ("jobs2", "local"):
            assert same_tensors(
                tmp_path / "serial" / run / "checkpoint.safetensors",
                tmp_path / other / run / "checkpoint.safetensors",
            )
        log = (tmp_path / "jobs2" / "logs" / run).with_suffix(".log")  # each child's output, in the study's logs/
        assert "$ ldae " in log.read_text() and f"log logs/{run}.log" in both.stdout


def test_a_failing_child_is_named_while_the_others_finish(run_main, tmp_path, pattern_tree):
    broken = {"name": "too deep", "probe_set": {"probe.depth": 5}}  # l-DAE's pretrain, a probe past its 1 block
    study = {**TWO_ROWS, "variants": [TOY_STUDY["variants"][0], broken]}
    args = study_args(tmp_path, pattern_tree, study, TOY_BUDGET, "out")
    result = run_main(*args, "--jobs", "2")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith("error: 1 of 3 runs did not finish: probe too deep, seed 0: exit 1: ") and "\n" not in line
    assert "depth 5 is outside" in line and f"(log {tmp_path / 'out' / 'logs' / 'probe' / 'too-deep-s0.log'})" in line
    assert (tmp_path / "out" / "probe" / "l-dae-s0" / "results.json").is_file()  # the other probe finished
    assert not (tmp_path / "out" / "results.json").exists()  # no page for a seed with a failed run


def test_sigterm_makes_every_running_child_save_and_the_study_continues_them(tmp_path, pattern_tree):
    longer = {**TOY_BUDGET, "pretrain": {**TOY_BUDGET["pretrain"], "optim.epochs": 2000, "run.save_every": 10**5}}
    args = study_args(tmp_path, pattern_tree, TWO_ROWS, longer, "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    study = subprocess.Popen(
        [sys.executable, "-m", "ldae_cli", *args, "--jobs", "2"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics = [tmp_path / "out" / "pretrain" / f"{name}-s0" / "metrics.jsonl" for name in ("l-dae", "pixel-dae")]
    deadline = time.monotonic() + 120
    while not all(m.is_file() and '"step": 2,' in m.read_text() for m in metrics):
        assert time.monotonic() < deadline and study.poll() is None, "both pretrains never got going"
        time.sleep(0.2)
    study.send_signal(signal.SIGTERM)
    out, err = study.communicate(timeout=120)
    assert study.returncode == 143, err
    assert "study stopped by SIGTERM during pretrain l-DAE, seed 0, pretrain pixel DAE, seed 0" in err
    steps = []
    for name in ("l-dae", "pixel-dae"):
        extra = read_metadata(tmp_path / "out" / "pretrain" / f"{name}-s0" / "checkpoint.safetensors")["extra"]
        assert not extra.get("finished") and extra["step"] >= 2
        steps.append(extra["step"])
    plan = subprocess.run(
        [sys.executable, "-m", "ldae_cli", *args, "--dry-run"], env=env, text=True, capture_output=True
    )
    assert plan.returncode == 0, plan.stderr
    for step in steps:
        assert f"to continue from step {step:,}" in plan.stdout


def test_a_log_path_through_a_link_is_refused_before_any_run_starts(run_main, tmp_path, pattern_tree):
    args = study_args(tmp_path, pattern_tree, TWO_ROWS, TOY_BUDGET, "out")
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's notes\n")
    logs = tmp_path / "out" / "logs" / "probe"
    logs.mkdir(parents=True)
    (logs / "pixel-dae-s0.log").symlink_to(mine)
    result = run_main(*args, "--jobs", "2")
    assert result.returncode == 1 and "pixel-dae-s0.log is a symbolic link" in result.stderr
    assert mine.read_text() == "the user's notes\n" and not (tmp_path / "out" / "pretrain").exists()
