"""Runs written by an earlier ldae keep working: a checkpoint written at the base commit of the module
reorganisation (tests/fixtures/resume-base, see make_resume_fixture.py) resumes with today's code.

Bit equality is asserted where it is defined: on the machine running the test, resuming the old checkpoint in one go
and in two pieces (stopped after one step, resumed again) ends bit-equal. Against the uninterrupted run written
with the fixture, on whatever machine made it, the end agrees to float32 rounding: CPU kernels differ between
instruction sets (AVX2, AVX-512), so bits across machines are not a property of ldae (measured: at most 3e-11 apart
on an AVX-512 machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from helpers import write_pattern_tree

from ldae_cli.runs.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "resume-base"


def _resume(run_main, run: Path, images: Path, *extra: str) -> None:
    res = run_main("pretrain", "--resume", str(run), "--set", f"data.path={images}", *extra)
    assert res.returncode == 0, res.stderr


def test_a_checkpoint_from_the_base_commit_resumes_exactly(run_main, tmp_path):
    images = write_pattern_tree(tmp_path / "images")  # the same images the fixture was trained on
    whole = shutil.copytree(FIXTURE / "cut", tmp_path / "whole")
    pieces = shutil.copytree(FIXTURE / "cut", tmp_path / "pieces")
    assert load_checkpoint(whole / "checkpoint.safetensors").extra["step"] == 3
    _resume(run_main, whole, images)
    _resume(run_main, pieces, images, "--set", "run.stop_after_steps=1")
    assert load_checkpoint(pieces / "checkpoint.safetensors").extra["step"] == 4
    _resume(run_main, pieces, images)

    resumed = load_checkpoint(whole / "checkpoint.safetensors")
    in_pieces = load_checkpoint(pieces / "checkpoint.safetensors")
    expected = load_checkpoint(FIXTURE / "final.safetensors")
    assert resumed.extra["step"] == in_pieces.extra["step"] == expected.extra["step"] == 6
    assert resumed.tensors.keys() == in_pieces.tensors.keys() == expected.tensors.keys()
    assert not [k for k in resumed.tensors if not torch.equal(resumed.tensors[k], in_pieces.tensors[k])]
    apart = {
        k: (resumed.tensors[k].double() - expected.tensors[k].double()).abs().max().item() for k in expected.tensors
    }
    assert max(apart.values()) < 1e-6, sorted(apart.items(), key=lambda kv: -kv[1])[:3]
    for run in (whole, pieces):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
