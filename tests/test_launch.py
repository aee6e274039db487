"""`ldae launch`: a job preempted (SIGUSR2, as SLURM warns) saves, is requeued and finishes its run bit for bit
as an uninterrupted one; submitit's local executor stands in for SLURM."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from helpers import tiny_overrides
from safetensors.torch import load_file

from ldae_cli.cli import run_in_process
from ldae_cli.errors import LdaeError
from ldae_cli.runs import slurm
from ldae_cli.runs.checkpoint import read_metadata

SETS = {
    "tokenizer.patch": 4,
    "tokenizer.dim": 8,
    "optim.epochs": 12,
    "optim.ema": 0.9,
    "run.save_every": 1,
    "online_probe.enabled": False,
}


def test_a_preempted_job_is_requeued_and_finishes_bit_equal(pattern_tree, run_main, tmp_path):
    assert (
        run_main(
            "fit-pca",
            "--source",
            "imagefolder",
            "--data",
            str(pattern_tree),
            "--patch",
            "4",
            "--dim",
            "8",
            "--patches",
            "4000",
            "--image-size",
            "32",
            "--out",
            str(tmp_path / "pca.safetensors"),
            "--set",
            "data.num_workers=0",
        ).returncode
        == 0
    )
    sets = {**SETS, "tokenizer.path": tmp_path / "pca.safetensors"}
    whole = [
        "pretrain",
        "--config",
        "final.yaml",
        *[a for s in tiny_overrides(pattern_tree, tmp_path / "whole", **sets) for a in ("--set", s)],
    ]
    assert run_main(*whole).returncode == 0
    out = tmp_path / "job"
    argv = [
        "pretrain",
        "--config",
        "final.yaml",
        "--out",
        str(out),
        *[a for s in tiny_overrides(pattern_tree, out, **sets) for a in ("--set", s)],
    ]
    job = slurm.submit(
        argv,
        run_in_process,
        local=True,
        nodes=1,
        gpus_per_node=0,
        options=slurm.JobOptions(time_min=10, cpus_per_task=1),
        folder=tmp_path / "jobs",
    )
    deadline = time.time() + 120
    while not ((out / "checkpoint.safetensors").exists() and (out / ".ldae.lock").exists()):
        assert time.time() < deadline and job.state != "FINISHED", "the job never saved a checkpoint"
        time.sleep(0.05)
    task = json.loads((out / ".ldae.lock").read_text())["pid"]  # the task running the training loop
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before a preemption or the time limit
    assert job.result() == str(out)
    logs = "".join(p.read_text() for p in (tmp_path / "jobs").glob("*log.out"))
    assert "(SIGUSR2); the checkpoint of step" in logs and "resuming" in logs, logs[-3000:]
    assert read_metadata(out / "checkpoint.safetensors")["extra"]["finished"]
    a, b = load_file(tmp_path / "whole" / "checkpoint.safetensors"), load_file(out / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("tokenizer"))


def test_a_launch_needs_a_training_stage_and_its_out(run_main):
    with pytest.raises(LdaeError, match="needs the command's --out"):
        slurm.check(["pretrain", "--config", "final.yaml"])
    with pytest.raises(LdaeError, match="runs a training stage"):
        slurm.check(["denoise", "x.jpg"])
    with pytest.raises(LdaeError, match="without\\s+--resume"):
        slurm.check(["pretrain", "--resume", "runs/x", "--out", "runs/x"])
    res = run_main("launch", "--", "denoise", "x.jpg")
    assert res.returncode == 1 and "runs a training stage" in res.stderr
    assert slurm.LdaeJob(["probe", "--ckpt", "c", "--out", "/nonexistent/p"], run_in_process).command()[-2:] == [
        "/nonexistent/p",
        "--continue",
    ]
