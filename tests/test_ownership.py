"""Reliability matrix, part two: ownership and integrity. `--force` removes only what ldae wrote, a user's files
(their config file, a project folder, the working or home directory) are never touched, exports never eat their
input, one run never merges into another (`--continue`, data identity on resume), prepared data is checked file
by file, non-finite checkpoints are refused everywhere, one process holds a lock, every option is in range, and an
interrupted run logs exactly what an uninterrupted one does. Each case asserts the exit code, the one-line message
and that every file that existed before is byte-identical afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REPO_ROOT,
    TOKENS,
    one_line,
    pretrain_args,
    probe_args,
    sets,
    snapshot,
    tiny_overrides,
    unchanged,
    write_pattern_tree,
)

from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from ldae_cli.runs.rundir import CONFIG, MARKER, Manifest

FAST = {"online_probe.enabled": False}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------------------ --force and ownership


def test_force_never_deletes_a_users_files(world, run_main, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("draft")
    (thesis / "config.yaml").write_text("a: 1\n")
    before = snapshot(thesis, world.root)
    one_line(run_main(*pretrain_args(world, thesis), "--force"), 1, "thesis.tex", "ldae did not write")
    unchanged(before)
    assert names(thesis) == ["config.yaml", "thesis.tex"]


def test_force_never_empties_the_working_or_home_directory(world, run_main, tmp_path, monkeypatch):
    for item in (world.root / "pre").iterdir():  # the working directory (run_main works in tmp_path) is a run
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp_path / item.name)
    before = snapshot(tmp_path)
    one_line(run_main(*pretrain_args(world, Path(".")), "--force"), 1, "it is the current directory")
    home = copy_run(world.root / "pre", tmp_path.parent / f"{tmp_path.name}-home")
    monkeypatch.setenv("HOME", str(home))
    one_line(run_main(*pretrain_args(world, home), "--force"), 1, "it is the home directory")
    unchanged(before)


def test_force_replaces_only_the_runs_own_files_and_removes_links_as_links(world, run_main, tmp_path):
    real = tmp_path / "scratch" / "runs"
    real.mkdir(parents=True)
    (tmp_path / "runs").symlink_to(real)  # `runs -> /scratch/runs`: usable, judged where it points
    run = tmp_path / "runs" / "x"
    assert run_main(*pretrain_args(world, run, **FAST, **{"tokenizer.path": world.pca})).returncode == 0
    assert (real / "x" / MARKER).is_file() and (real / "x" / "checkpoint.safetensors").is_file()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "events.txt").write_text("kept elsewhere")
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").symlink_to(precious)  # the user keeps the dashboards on another disk
    assert (
        run_main(
            *pretrain_args(world, run, **FAST, **{"tokenizer.path": world.pca, "run.seed": 3}), "--force"
        ).returncode
        == 0
    )
    assert (precious / "events.txt").read_text() == "kept elsewhere"
    assert load_checkpoint(run / "checkpoint.safetensors").config["run"]["seed"] == 3
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    one_line(
        run_main(*pretrain_args(world, run, **FAST, **{"tokenizer.path": world.pca}), "--force"),
        1,
        "notes.txt",
        "ldae did not write",
    )
    unchanged(before)


def _legacy(src: Path, dst: Path) -> Path:
    """A run directory as ldae wrote it before the marker: config.yaml, no .ldae-run.json."""
    run = copy_run(src, dst)
    (run / MARKER).unlink()
    (run / CONFIG).rename(run / "config.yaml")
    return run


def test_a_run_from_before_the_marker_resumes_and_force_replaces_it_only_whole(world, run_main, tmp_path):
    old = _legacy(world.cut.parent, tmp_path / "old")
    assert run_main("pretrain", "--resume", str(old)).returncode == 0
    assert {"checkpoint.safetensors", "config.yaml", "metrics.jsonl"} <= Manifest.read(old).files
    mixed = _legacy(world.cut.parent, tmp_path / "mixed")
    (mixed / "notes.txt").write_text("mine")
    before = snapshot(mixed)
    one_line(run_main(*pretrain_args(world, mixed), "--force"), 1, "notes.txt")
    unchanged(before)
    plain = _legacy(world.cut.parent, tmp_path / "plain")
    assert run_main(*pretrain_args(world, plain, **FAST, **{"tokenizer.path": world.pca}), "--force").returncode == 0
    assert "config.yaml" not in names(plain) and CONFIG in names(plain)


def test_the_users_config_file_in_the_run_directory_is_theirs(world, run_main, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text("base: final.yaml\noptim:\n  epochs: 2\n")
    before = snapshot(exp)
    args = sets(tiny_overrides(world.images, exp, **TOKENS, **FAST, **{"tokenizer.path": world.pca}))
    assert run_main("pretrain", "--config", str(exp / "config.yaml"), *args).returncode == 0
    unchanged(before)
    assert (exp / CONFIG).is_file() and "config.yaml" not in Manifest.read(exp).files
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "config.yaml").write_text("base: final.yaml\n")
    before = snapshot(failed)
    args = sets(tiny_overrides(tmp_path / "no-such-data", failed, **TOKENS, **FAST, **{"tokenizer.path": world.pca}))
    one_line(run_main("pretrain", "--config", str(failed / "config.yaml"), *args), 1, "no-such-data")
    unchanged(before)
    assert names(failed) == ["config.yaml"]  # a failed start removes what it wrote: its config, marker, lock


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_the_same_command(world, run_main, tmp_path):
    run = tmp_path / "run"
    args = pretrain_args(world, run, **FAST, **{"tokenizer.path": world.pca})
    assert run_main(*args).returncode == 0
    (run / "checkpoint.safetensors").unlink()  # what a SIGKILL after the first metrics line leaves
    before = snapshot(run)
    one_line(
        run_main(*pretrain_args(world, run, **FAST, **{"tokenizer.path": world.pca, "run.seed": 4})), 1, "already holds"
    )  # another recipe is not this run
    unchanged(before)
    res = run_main(*args)
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(run / "checkpoint.safetensors").extra["finished"]


# ------------------------------------------------------------------------------------------ exports


def test_exports_never_eat_their_input_or_a_run(world, run_main, tmp_path):
    mine = tmp_path / "mine.safetensors"
    shutil.copy2(world.ckpt, mine)
    before = snapshot(tmp_path, world.root)
    for force in ([], ["--force"]):
        one_line(run_main("export", "--ckpt", str(mine), "--out", str(mine), *force), 1, "also an input")
        one_line(run_main("export", "--ckpt", str(mine), "--out", str(world.ckpt), *force), 1, "belongs to the run")
    pca = tmp_path / "pca-copy.safetensors"
    shutil.copy2(world.pca, pca)
    one_line(run_main("export", "--ckpt", str(mine), "--out", str(pca), "--force"), 1, "is a 'pca' checkpoint")
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my project")
    one_line(
        run_main("export", "--ckpt", str(mine), "--out", str(project), "--format", "timm", "--force"),
        1,
        "README.md",
        "ldae did not write",
    )
    one_line(
        run_main("export", "--ckpt", str(mine), "--out", str(world.root / "pre"), "--format", "timm", "--force"),
        1,
        "ldae pretrain",
    )  # a run's folder is not an export's
    unchanged(before)
    assert (project / "README.md").read_text() == "my project" and names(project) == ["README.md"]
    folder = tmp_path / "vit"
    assert run_main("export", "--ckpt", str(mine), "--out", str(folder), "--format", "timm").returncode == 0
    one_line(run_main("export", "--ckpt", str(mine), "--out", str(folder), "--format", "timm"), 1, "already holds")
    assert (
        run_main(
            "export", "--ckpt", str(mine), "--out", str(folder), "--format", "timm", "--t", "20", "--force"
        ).returncode
        == 0
    )
    assert Manifest.read(folder).files == {"README.md", "config.json", "model.safetensors"}


# ------------------------------------------------------------------------------------------ one run per directory


def test_continue_starts_continues_finishes_and_refuses_another_recipe(world, run_main, tmp_path):
    run = tmp_path / "run"
    base = {**FAST, "tokenizer.path": world.pca, "optim.epochs": 2, "run.save_every": 1}
    step = lambda: load_checkpoint(run / "checkpoint.safetensors").extra["step"]  # noqa: E731
    assert run_main(*pretrain_args(world, run, **base, **{"run.stop_after_steps": 1}), "--continue").returncode == 0
    assert step() == 1
    assert run_main(*pretrain_args(world, run, **base, **{"run.stop_after_steps": 1}), "--continue").returncode == 0
    assert step() == 2
    before = snapshot(run)
    one_line(
        run_main(*pretrain_args(world, run, **base, **{"run.seed": 9}), "--continue"),
        1,
        "holds another run",
        "run.seed: 0 -> 9",
    )
    unchanged(before)
    assert run_main(*pretrain_args(world, run, **base), "--continue").returncode == 0 and step() == 4
    again = run_main(*pretrain_args(world, run, **base), "--continue")
    assert again.returncode == 0 and "already finished" in again.stdout


def test_launch_never_forces_and_runs_its_command_with_continue():
    from ldae_cli.cli import run_in_process
    from ldae_cli.runs import slurm

    job = slurm.LdaeJob(["pretrain", "--config", "final.yaml", "--out", "runs/x"], run_in_process)
    assert job.command() == ["pretrain", "--config", "final.yaml", "--out", "runs/x", "--continue"]
    with pytest.raises(LdaeError, match="without --continue"):
        slurm.check(["pretrain", "--out", "runs/x", "--continue"])


def test_a_failed_job_reports_the_stages_own_error(run_main, tmp_path):
    res = run_main(
        "launch",
        "--local",
        "--gpus-per-node",
        "0",
        "--wait",
        "--folder",
        str(tmp_path / "jobs"),
        "--",
        "pretrain",
        "--config",
        "final.yaml",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "optim.batch_size=0",
    )
    one_line(res, 1, "(pretrain) failed: optim.batch_size must be positive")


def test_resume_refuses_other_data_and_follows_moved_data(world, run_main, tmp_path):
    other = write_pattern_tree(tmp_path / "other", seed=1)
    run = copy_run(world.cut.parent, tmp_path / "run")
    before = snapshot(run)
    one_line(
        run_main("pretrain", "--resume", str(run), "--set", f"data.path={other}"), 1, "is not the data", "trained on"
    )
    unchanged(before)
    moved = shutil.copytree(world.images, tmp_path / "moved")
    assert run_main("pretrain", "--resume", str(run), "--set", f"data.path={moved}").returncode == 0


# ------------------------------------------------------------------------------------------ integrity of data and files


def _prepare(run_main, data: Path, out: Path, size: int, *extra: str):
    return run_main(
        "prepare-data",
        "--source",
        "imagefolder",
        "--data",
        str(data),
        "--image-size",
        str(size),
        "--out",
        str(out),
        "--set",
        "data.num_workers=0",
        *extra,
    )


def test_prepared_data_is_checked_shard_by_shard(pattern_tree, run_main, tmp_path):
    from ldae_cli.config import load_config
    from ldae_cli.data.pipeline import DataConfig, build_dataset

    out = tmp_path / "prepared"
    assert _prepare(run_main, pattern_tree, out, 32).returncode == 0
    one_line(_prepare(run_main, pattern_tree, out, 16), 1, "other settings", "--force")
    assert _prepare(run_main, pattern_tree, out, 16, "--force").returncode == 0
    meta = json.loads((out / "prepared.json").read_text())
    assert meta["stored_size"] == 16
    for split, info in meta["splits"].items():  # nothing stale: every file is one the new preparation lists
        assert set(names(out / split)) == set(info["file_sha256"]) | {
            f"skipped-{k:05d}.txt" for k in range(len(info["shards"]))
        }
    ok = run_main("prepare-data", "--verify", str(out))
    assert ok.returncode == 0 and "every file matches" in ok.stdout

    def opened(verify: bool = True):
        cfg = load_config(
            DataConfig,
            None,
            [f"path={out}", "source=imagefolder", "image_size=16", "num_workers=0", f"verify={str(verify).lower()}"],
        )
        return build_dataset(cfg, "train")

    shard = out / "train" / "images-00000.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # one flipped bit in the last image
    shard.write_bytes(bytes(raw))
    with pytest.raises(LdaeError, match=r"images-00000\.npy: its sha256 differs"):
        opened()
    assert len(opened(verify=False)) == 16  # data.verify=false: for datasets too large to hash at every start
    one_line(run_main("prepare-data", "--verify", str(out)), 1, "images-00000.npy")
    raw[-5] ^= 0x01
    shard.write_bytes(bytes(raw))
    labels = out / "train" / "labels.npy"
    np.save(labels, np.zeros(16, dtype=np.int64))
    with pytest.raises(LdaeError, match=r"labels\.npy: its sha256 differs"):
        opened()


def _with_nan(src: Path, dst: Path) -> Path:
    ck = load_checkpoint(src)
    meta = read_metadata(src)
    tensors = dict(ck.tensors)
    key = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_checkpoint(dst, meta["kind"], tensors, meta["config"], extra=meta["extra"])
    return dst


def test_a_checkpoint_with_non_finite_weights_is_refused_by_every_stage(world, run_main, tmp_path):
    bad = _with_nan(world.ckpt, tmp_path / "nan.safetensors")
    image = next((world.images / "val" / "a").glob("*.png"))
    before = snapshot(tmp_path, world.root)
    commands = [
        ("export", "--ckpt", str(bad), "--out", str(tmp_path / "vit.safetensors")),
        ("denoise", str(image), "--ckpt", str(bad), "--out", str(tmp_path / "panel.png")),
        tuple(probe_args(world, tmp_path / "probe", ckpt=bad)),
        (
            "finetune",
            "--ckpt",
            str(bad),
            "--config",
            "finetune/cifar10",
            "--out",
            str(tmp_path / "ft"),
            "--data",
            str(world.images),
            "--source",
            "imagefolder",
            "--set",
            "data.image_size=32",
        ),
        ("detect", "--ckpt", str(bad), "--config", "detect/cpu-tiny", "--out", str(tmp_path / "det")),
    ]
    for args in commands:
        one_line(run_main(*args), 1, "holds NaN or infinite values", str(bad))
    run = copy_run(world.cut.parent, tmp_path / "cut")
    _with_nan(run / "checkpoint.safetensors", run / "checkpoint.safetensors")
    line = one_line(run_main("pretrain", "--resume", str(run)), 1, "holds NaN or infinite values")
    assert "last good checkpoint" not in line
    unchanged(before)


def _edited(run: Path, edit) -> Path:
    ckpt = run / "checkpoint.safetensors"
    ck, meta = load_checkpoint(ckpt), read_metadata(ckpt)
    tensors = dict(ck.tensors)
    edit(meta, tensors)
    save_checkpoint(ckpt, meta["kind"], tensors, meta["config"], extra=meta["extra"])
    return run


EDITS = [
    ("steps per epoch 0", lambda m, t: m["extra"].update(steps_per_epoch=0), "not a valid position in a run"),
    ("step past the end", lambda m, t: m["extra"].update(step=99), "not a valid position in a run"),
    ("dropped optimizer tensor", lambda m, t: t.pop("optim.state.0.exp_avg"), "optimizer state does not fit"),
]


@pytest.mark.parametrize("name,edit,fragment", EDITS, ids=[n for n, _, _ in EDITS])
def test_an_edited_train_state_is_one_line(name, edit, fragment, world, run_main, tmp_path):
    run = _edited(copy_run(world.cut.parent, tmp_path / "run"), edit)
    before = snapshot(run)
    one_line(run_main("pretrain", "--resume", str(run)), 1, fragment, str(run))
    unchanged(before)


# ------------------------------------------------------------------------------------------ one lock holder

RACE = """
import json, multiprocessing, os, socket, subprocess, sys
from pathlib import Path
from ldae_cli.errors import LdaeError
from ldae_cli.runs.rundir import LOCK, RunLock

def contend(directory, barrier, results, done):
    barrier.wait()
    try:
        RunLock(directory, "pretrain").acquire()
    except LdaeError:
        results.put(False)
    else:
        results.put(True)
    done.wait(30)
    os._exit(0)

dead = subprocess.Popen([sys.executable, "-c", "pass"])
dead.wait()
ctx = multiprocessing.get_context("fork")
counts = []
for trial in range(60):
    folder = Path(sys.argv[1]) / f"t{trial}"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))  # a crashed run's
    barrier, results, done = ctx.Barrier(6), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=contend, args=(folder, barrier, results, done)) for _ in range(6)]
    for p in procs:
        p.start()
    holders = [results.get(timeout=60) for _ in procs]
    done.set()
    for p in procs:
        p.join(timeout=60)
    counts.append(holders.count(True))
print(json.dumps(counts))
"""


def test_exactly_one_of_six_processes_takes_a_contested_stale_lock(tmp_path):
    """60 trials, 6 forked processes calling the lock code at once on a stale lock (in a small interpreter, so that
    forking is cheap): exactly one holder every time."""
    out = subprocess.run(
        [sys.executable, "-c", RACE, str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [1] * 60


# ------------------------------------------------------------------------------------------ every option in range

RANGES = [
    ({"optim.min_lr": 1.0}, "optim.min_lr 1 is above the peak lr"),
    ({"optim.epochs": ".nan"}, "optim.epochs: expected a finite number"),
    ({"optim.epochs": ".inf"}, "optim.epochs: expected a finite number"),
    ({"run.seed": 2**31}, "run.seed must lie in 0 ... 2147483647"),
    ({"data.eval_split": "nope"}, "no 'nope' split"),
]


@pytest.mark.parametrize("extra,fragment", RANGES, ids=[next(iter(e)) for e, _ in RANGES])
def test_an_option_out_of_range_is_named_before_anything_is_written(extra, fragment, world, run_main, tmp_path):
    before = snapshot(world.root)
    one_line(run_main(*pretrain_args(world, tmp_path / "run", **extra)), 1, fragment)
    assert not (tmp_path / "run").exists()
    unchanged(before)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--sigma", "0"), "--sigma is a noise level"),
        (("--sigma", "nan"), "--sigma is a noise level"),
        (("--sigma", "inf"), "--sigma is a noise level"),
        (("--samples", "0"), "--samples is a number of images"),
    ],
)
def test_denoise_options_out_of_range_are_named(args, fragment, world, run_main, tmp_path):
    image = next((world.images / "val" / "a").glob("*.png"))
    one_line(
        run_main("denoise", str(image), "--ckpt", str(world.ckpt), "--out", str(tmp_path / "p.png"), *args), 1, fragment
    )
    assert not (tmp_path / "p.png").exists()


# ------------------------------------------------------------------------------------------ interruptions

TIMING = ("img_per_s", "time_s", "data_wait", "online_probe_s")


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_and_resumed_run_logs_what_an_uninterrupted_one_does(sig, world, tmp_path):
    settings = {
        **FAST,
        "tokenizer.path": world.pca,
        "optim.epochs": 60,
        "run.log_every": 3,
        "run.save_every": 7,
        "run.tensorboard": False,
    }
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.Popen(
            [sys.executable, "-m", "ldae_cli", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )

    assert cli(*pretrain_args(world, tmp_path / "whole", **settings)).wait(timeout=300) == 0
    run = tmp_path / "cut"
    proc = cli(*pretrain_args(world, run, **settings))
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    stopped = load_checkpoint(run / "checkpoint.safetensors").extra["step"]
    assert 0 < stopped < 120
    assert cli("pretrain", "--resume", run).wait(timeout=300) == 0
    assert _records(run) == _records(tmp_path / "whole")
    a, b = (load_checkpoint(p / "checkpoint.safetensors").tensors for p in (tmp_path / "whole", run))
    assert all(torch.equal(a[k], b[k]) for k in a)
