"""Reliability matrix, hostile options: an option a command would not use, settings that contradict each other and
a new run whose input lies in the folder it would replace are each refused up front in one line, files untouched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import TOKENS, one_line, pretrain_args, probe_args, sets, snapshot, tiny_overrides, unchanged

from ldae_cli.runs.rundir import CHECKPOINT

TINY_FINETUNE = [
    "optim.batch_size=8",
    "optim.epochs=1",
    "aug.rand_augment=null",
    "data.num_workers=0",
    "run.progress=false",
    "run.device=cpu",
    "run.log_every=1",
]


def finetune_args(world, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--ckpt",
        str(ckpt),
        "--config",
        "finetune/cifar10",
        "--out",
        str(out),
        "--data",
        str(world.images),
        "--set",
        "data.image_size=32",
        *sets([*TINY_FINETUNE, *extra]),
    ]


def scratch_finetune(out: Path, *extra: str) -> list[str]:
    return ["finetune", "--from-scratch", "--config", "finetune/cifar10", "--out", str(out), *sets(list(extra))]


def tokenizer_args(out: Path, *extra: str) -> list[str]:
    return ["train-tokenizer", "--config", "tokenizer/patch-ae", "--out", str(out), *sets(list(extra))]


def detect_args(out: Path, *extra: str) -> list[str]:
    return ["detect", "--config", "detect/cpu-tiny", "--from-scratch", "--out", str(out), *sets(list(extra))]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """A finetune run (one step of two, from world.ckpt) and a fast probe of world.ckpt, to resume."""
    from ldae_cli.cli import app

    root = tmp_path_factory.mktemp("hostile-runs")
    app(args=finetune_args(world, world.ckpt, root / "ft", "run.stop_after_steps=1"), standalone_mode=False)
    app(args=probe_args(world, root / "probe"), standalone_mode=False)
    return root


# ------------------------------------------------------------------------------------------ contradictory settings
# refused when the config is read: before any data is read or any directory made

CONTRADICTIONS = [
    (
        "pretrain warm-up = run",
        lambda w, o: pretrain_args(w, o, **{"optim.warmup_epochs": 1}),
        "optim.warmup_epochs 1 is not shorter than optim.epochs 1",
    ),
    (
        "pretrain warm-up > run",
        lambda w, o: pretrain_args(w, o, **{"optim.warmup_epochs": 5, "optim.epochs": 2}),
        "optim.warmup_epochs 5 is not shorter than optim.epochs 2",
    ),
    (
        "finetune warm-up = run",
        lambda w, o: scratch_finetune(o, "optim.epochs=1", "optim.warmup_epochs=1"),
        "optim.warmup_epochs 1 is not shorter than optim.epochs 1",
    ),
    (
        "finetune warm-up > run",
        lambda w, o: scratch_finetune(o, "optim.epochs=2", "optim.warmup_epochs=5"),
        "optim.warmup_epochs 5 is not shorter than optim.epochs 2",
    ),
    (
        "probe warm-up = run",
        lambda w, o: probe_args(w, o, "probe.warmup_epochs=1"),
        "probe.warmup_epochs 1 is not shorter than probe.epochs 1",
    ),
    (
        "probe warm-up > run",
        lambda w, o: probe_args(w, o, "probe.epochs=2", "probe.warmup_epochs=5"),
        "probe.warmup_epochs 5 is not shorter than probe.epochs 2",
    ),
    (
        "tokenizer warm-up = run",
        lambda w, o: tokenizer_args(o, "optim.epochs=2", "optim.warmup_epochs=2"),
        "optim.warmup_epochs 2 is not shorter than optim.epochs 2",
    ),
    (
        "tokenizer warm-up > run",
        lambda w, o: tokenizer_args(o, "optim.epochs=2", "optim.warmup_epochs=5"),
        "optim.warmup_epochs 5 is not shorter than optim.epochs 2",
    ),
    (
        "detect warm-up = run",
        lambda w, o: detect_args(o, "optim.warmup_iterations=200"),
        "optim.warmup_iterations 200 is not fewer than optim.iterations 200",
    ),
    (
        "detect warm-up > run",
        lambda w, o: detect_args(o, "optim.warmup_iterations=500"),
        "optim.warmup_iterations 500 is not fewer than optim.iterations 200",
    ),
    (
        "micro-batch not dividing the batch",
        lambda w, o: pretrain_args(w, o, **{"optim.micro_batch": 3}),
        "optim.micro_batch 3 does not divide optim.batch_size 8",
    ),
    (
        "micro-batch above the batch",
        lambda w, o: detect_args(o, "optim.micro_batch=4"),
        "optim.micro_batch 4 does not divide optim.batch_size 2",
    ),
    (
        "min lr above lr",
        lambda w, o: pretrain_args(w, o, **{"optim.lr": 1e-4, "optim.min_lr": 1e-3}),
        "optim.min_lr 0.001 is above the peak lr 0.0001",
    ),
    (
        "crop scale min above max",
        lambda w, o: pretrain_args(w, o, **{"data.crop_scale": "[0.9,0.2]"}),
        "data.crop_scale: expected [min, max] with 0 < min <= max",
    ),
    (
        "online k-NN k above its fit images",
        lambda w, o: pretrain_args(w, o, **{"online_probe.fit_images": 30, "online_probe.knn_k": 50}),
        "online_probe.knn_k 50 is more than online_probe.fit_images 30",
    ),
    (
        "online linear batch above its fit images",
        lambda w, o: pretrain_args(w, o, **{"online_probe.fit_images": 30, "online_probe.linear_batch": 64}),
        "online_probe.linear_batch 64 is more than online_probe.fit_images 30",
    ),
    (
        "mixup on an odd micro-batch",
        lambda w, o: scratch_finetune(o, "optim.batch_size=15"),
        "pair the samples of a micro-batch, which must be even, but it holds 15",
    ),
    (
        "detect lr step inside the warm-up",
        lambda w, o: detect_args(o, "optim.lr_steps=[0.05]"),
        "puts the first lr step at iteration 10, inside the optim.warmup_iterations 20",
    ),
    (
        "detect evaluation cadence beyond the run",
        lambda w, o: detect_args(o, "eval.every=500"),
        "eval.every 500 is more than optim.iterations 200",
    ),
]


@pytest.mark.parametrize("args,fragment", [c[1:] for c in CONTRADICTIONS], ids=[c[0] for c in CONTRADICTIONS])
def test_settings_that_contradict_each_other_are_refused_up_front(args, fragment, world, run_main, tmp_path):
    before = snapshot(world.root)
    one_line(run_main(*args(world, tmp_path / "run")), 1, fragment)
    assert not (tmp_path / "run").exists()
    unchanged(before)


# ------------------------------------------------------------------------------------------ options a resume ignores

UNUSED_OPTIONS = [
    (
        "finetune --resume --ckpt another",
        lambda w, r: ["finetune", "--resume", r / "ft", "--ckpt", w.cut],
        "not from --ckpt",
        "leave out --ckpt",
    ),
    (
        "finetune --resume --force",
        lambda w, r: ["finetune", "--resume", r / "ft", "--force"],
        "--force replaces a run",
        "give one of them",
    ),
    (
        "pretrain --resume --init-from",
        lambda w, r: ["pretrain", "--resume", w.cut.parent, "--init-from", w.ckpt],
        "--init-from starts a new run",
        "give one of them",
    ),
    (
        "pretrain --resume --force",
        lambda w, r: ["pretrain", "--resume", w.cut.parent, "--force"],
        "--force replaces a run, and --resume",
    ),
    (
        "pretrain --continue --force",
        lambda w, r: [*pretrain_args(w, w.cut.parent), "--continue", "--force"],
        "--force replaces a run, and --continue",
    ),
    (
        "probe --resume --ckpt another",
        lambda w, r: ["probe", "--resume", r / "probe", "--ckpt", w.cut],
        "is not the pretrain checkpoint",
        "sha256 differs",
    ),
    (
        "probe --resume --random-init",
        lambda w, r: ["probe", "--resume", r / "probe", "--random-init"],
        "holds a probe without --random-init",
        "resume it as it was started",
    ),
    ("probe --resume --force", lambda w, r: ["probe", "--resume", r / "probe", "--force"], "give one of them"),
    (
        "finetune --resume --from-scratch",
        lambda w, r: ["finetune", "--resume", r / "ft", "--from-scratch"],
        "config differs (model.from_scratch: False -> True)",
    ),
    (
        "probe --random-init of pixels",
        lambda w, r: [*probe_args(w, r / "new-probe", "probe.features=pixels"), "--random-init"],
        "--random-init probes an untrained encoder",
    ),
    (
        "train-tokenizer --resume --force",
        lambda w, r: ["train-tokenizer", "--resume", r / "ft", "--force"],
        "--force replaces a run",
    ),
    ("detect --resume --force", lambda w, r: ["detect", "--resume", r / "ft", "--force"], "--force replaces a run"),
]


@pytest.mark.parametrize("args,fragments", [(c[1], c[2:]) for c in UNUSED_OPTIONS], ids=[c[0] for c in UNUSED_OPTIONS])
def test_an_option_a_resumed_run_would_not_use_is_refused(args, fragments, world, runs, run_main):
    before = snapshot(world.root, runs)
    one_line(run_main(*args(world, runs)), 1, *fragments)
    unchanged(before)
    assert not (runs / "new-probe").exists()


def test_a_resume_may_name_its_parent_where_it_moved(world, runs, run_main, tmp_path):
    """--ckpt on a resume locates the checkpoint the run was made from: the same file elsewhere is accepted."""
    moved = tmp_path / "moved.safetensors"
    shutil.copy2(world.ckpt, moved)
    run = shutil.copytree(runs / "ft", tmp_path / "ft")
    before = snapshot(world.root, runs)
    res = run_main("finetune", "--resume", run, "--ckpt", moved)
    assert res.returncode == 0, res.stderr
    unchanged(before)


# ------------------------------------------------------------------------------------------ inputs inside --out


def copy_of_parent(world, tmp_path: Path) -> Path:
    return shutil.copytree(world.ckpt.parent, tmp_path / "parent")


INPUT_IN_OUT = [
    (
        "pretrain --init-from RUN/ckpt --out RUN",
        lambda w, run, out: [*pretrain_args(w, out), "--init-from", run / CHECKPOINT, "--force"],
        "--init-from",
    ),
    (
        "pretrain tokenizer.path=RUN/pca --out RUN",
        lambda w, run, out: [*pretrain_args(w, out, **{"tokenizer.path": run / "pca.safetensors"}), "--force"],
        "tokenizer.path",
    ),
    (
        "probe --ckpt RUN/ckpt --out RUN",
        lambda w, run, out: [*probe_args(w, out, ckpt=run / CHECKPOINT), "--force"],
        "--ckpt",
    ),
    (
        "finetune --ckpt RUN/ckpt --out RUN",
        lambda w, run, out: [*finetune_args(w, run / CHECKPOINT, out), "--force"],
        "--ckpt",
    ),
    (
        "detect --ckpt RUN/ckpt --out RUN",
        lambda w, run, out: [
            "detect",
            "--config",
            "detect/cpu-tiny",
            "--ckpt",
            run / CHECKPOINT,
            "--out",
            out,
            "--force",
        ],
        "--ckpt",
    ),
]


@pytest.mark.parametrize("via_link", [False, True], ids=["plain", "out through a symlinked folder"])
@pytest.mark.parametrize("args,option", [c[1:] for c in INPUT_IN_OUT], ids=[c[0] for c in INPUT_IN_OUT])
def test_a_new_run_never_replaces_the_folder_holding_its_input(args, option, via_link, world, run_main, tmp_path):
    run = copy_of_parent(world, tmp_path)
    out = run
    if via_link:
        out = tmp_path / "link"
        os.symlink(run, out)
    before = snapshot(run)
    line = one_line(run_main(*args(world, run, out)), 1, option, "lies in", "pick another --out")
    assert str(run.resolve()) in line
    unchanged(before)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in world.ckpt.parent.iterdir())


def test_the_input_is_found_through_a_symlinked_input_path_and_the_default_folder(world, run_main, tmp_path):
    """`--config final.yaml --init-from runs/pretrain/final-images/...` writes runs/pretrain/final-images (config and
    data folder) by default: refused too, also when the input is named through a link to that folder."""
    default = shutil.copytree(world.ckpt.parent, tmp_path / "runs" / "pretrain" / f"final-{world.images.name}")
    os.symlink(default, tmp_path / "alias")
    before = snapshot(default)
    overrides = [s for s in tiny_overrides(world.images, default, **TOKENS) if not s.startswith("run.out_dir=")]
    res = run_main(
        "pretrain", "--config", "final.yaml", *sets(overrides), "--init-from", f"alias/{CHECKPOINT}", "--force"
    )
    one_line(res, 1, "--init-from alias/", "lies in", str(default.resolve()))
    unchanged(before)
