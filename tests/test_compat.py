"""Runs written by an earlier ldae keep working: a checkpoint written at the base commit of the module
reorganisation (tests/fixtures/resume-base, see make_resume_fixture.py) resumes with today's code and ends bit-equal
to the run that was never interrupted, also written then (same seeds, data order, noise and train state)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import write_pattern_tree
from ldae_cli.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "resume-base"


def test_a_checkpoint_from_the_base_commit_resumes_bit_exactly(run_main, tmp_path):
    images = write_pattern_tree(tmp_path / "images")  # the same images the fixture was trained on
    run = shutil.copytree(FIXTURE / "cut", tmp_path / "cut")
    assert load_checkpoint(run / "checkpoint.safetensors").extra["step"] == 3
    res = run_main("pretrain", "--resume", str(run), "--set", f"data.path={images}")
    assert res.returncode == 0, res.stderr
    resumed = load_checkpoint(run / "checkpoint.safetensors")
    expected = load_checkpoint(FIXTURE / "final.safetensors")
    assert resumed.extra["step"] == expected.extra["step"] == 6
    assert resumed.tensors.keys() == expected.tensors.keys()
    differ = [k for k in expected.tensors if not torch.equal(resumed.tensors[k], expected.tensors[k])]
    assert not differ, differ
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
