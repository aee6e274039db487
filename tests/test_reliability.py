"""Reliability matrix: faults (kills, SIGTERM, SIGINT, NaN, a full disk, a read-only folder, two runs at once),
bad files and bad options. Every case asserts the exit code, the one-line message, and that every file that
existed before the command is byte-identical afterwards (and that a failed start leaves no run directory)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    REPO_ROOT,
    TOKENS,
    kept_or_appended,
    one_line,
    pretrain_args,
    probe_args,
    rewrite_metadata,
    sets,
    snapshot,
    tiny_overrides,
    unchanged,
    write_pattern_tree,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from ldae_cli.runs.checkpoint import load_checkpoint

# ------------------------------------------------------------------------------------------ bad options
# each is rejected when the config is read, before any data is read or any directory made

BAD_OPTIONS = [
    ({"model.width": 0}, "model: width must be >= 4"),
    ({"model.num_heads": 3}, "model.width 32 must be divisible by model.num_heads 3"),
    ({"run.log_every": 0}, "run.log_every and run.save_every are numbers of steps"),
    ({"run.save_every": -1}, "run.log_every and run.save_every are numbers of steps"),
    ({"run.stop_after_steps": 0}, "run.stop_after_steps must be 1 or more"),
    ({"optim.batch_size": 0}, "optim.batch_size must be positive"),
    ({"optim.micro_batch": 0}, "optim.micro_batch must be a positive integer"),
    ({"optim.lr": -1}, "optim.lr must be > 0"),
    ({"optim.blr": 1e308, "optim.batch_size": 2048}, "overflows to inf"),
    ({"optim.ema": 1.5}, "optim.ema is a decay in (0, 1)"),
    ({"optim.betas": "[0.9,1.5]"}, "optim.betas needs two values in [0, 1)"),
    ({"data.num_workers": -1}, "data.num_workers must be >= 0"),
    ({"data.crop_scale": "[]"}, "data.crop_scale"),
    ({"data.image_size": 30}, "data.image_size 30 is not a multiple of tokenizer.patch 4"),
    ({"tokenizer.dim": 100}, "tokenizer.dim 100 is more than the 48 values"),
    ({"tokenizer.fit_patches": 10}, "tokenizer.fit_patches"),
    ({"diffusion.schedule": "cosine"}, "'cosine' is not one of"),
    ({"diffusion.constant_sigma": 0}, "diffusion.constant_sigma must be a positive noise level"),
    ({"model.class_dropout": 1.0}, "model.class_dropout must be in [0, 1)"),
    ({"online_probe.knn_temperature": 0}, "online_probe.knn_temperature must be > 0"),
    ({"model.widht": 64}, "did you mean 'model.width'"),
]


@pytest.mark.parametrize("extra,fragment", BAD_OPTIONS, ids=[next(iter(e)) for e, _ in BAD_OPTIONS])
def test_a_bad_pretrain_option_is_refused_up_front(extra, fragment, world, run_main, tmp_path):
    before = snapshot(world.root)
    one_line(run_main(*pretrain_args(world, tmp_path / "run", **extra)), 1, fragment)
    assert not (tmp_path / "run").exists()
    unchanged(before)


BAD_STAGE_OPTIONS = [
    (lambda w, out: probe_args(w, out, "probe.blrs=[-1]"), "probe.blrs"),
    (lambda w, out: probe_args(w, out, "probe.t=-1"), "probe.t must be >= 0"),
    (lambda w, out: probe_args(w, out, "probe.knn_k=0"), "probe.knn_k must be a positive integer"),
    (
        lambda w, out: [
            "finetune",
            "--from-scratch",
            "--config",
            "finetune/cifar10",
            "--out",
            str(out),
            "--set",
            "model.arch.num_heads=0",
        ],
        "model.arch: width must be >= 4 and num_heads >= 1",
    ),
    (
        lambda w, out: [
            "detect",
            "--config",
            "detect/cpu-tiny",
            "--from-scratch",
            "--out",
            str(out),
            "--set",
            "optim.iterations=3",
        ],
        "optim.lr_steps",
    ),
    (
        lambda w, out: [
            "detect",
            "--config",
            "detect/cpu-tiny",
            "--from-scratch",
            "--out",
            str(out),
            "--set",
            "eval.every=0",
        ],
        "eval.every must be a positive number of iterations",
    ),
    (
        lambda w, out: [
            "fit-pca",
            "--patch",
            "4",
            "--dim",
            "4",
            "--patches",
            "10",
            "--out",
            str(out / "p.safetensors"),
        ],
        "pca.patches",
    ),
    (lambda w, out: ["pretrain", "--resume", str(out / "nowhere")], "no checkpoint there"),
    (lambda w, out: ["probe", "--ckpt", str(out / "missing.safetensors")], "checkpoint not found"),
]


@pytest.mark.parametrize("args,fragment", BAD_STAGE_OPTIONS, ids=[f for _, f in BAD_STAGE_OPTIONS])
def test_a_bad_option_of_any_stage_is_one_line(args, fragment, world, run_main, tmp_path):
    before = snapshot(world.root)
    one_line(run_main(*args(world, tmp_path / "run")), 1, fragment)
    assert not (tmp_path / "run").exists()
    unchanged(before)


# ------------------------------------------------------------------------------------------ bad files


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _bad_json(src: Path, dst: Path) -> Path:
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'"ldae.extra":"{', b'"ldae.extra":"[{', 1)
    dst.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])
    return dst


BAD_FILES = [
    ("truncated", _truncated, "checkpoint is truncated"),
    ("random bytes", lambda s, d: d.write_bytes(os.urandom(4000)) and d, "not an ldae checkpoint"),
    ("empty", lambda s, d: d.write_bytes(b"") == 0 and d, "too short for safetensors"),
    ("foreign safetensors", lambda s, d: save_file({"w": torch.zeros(2)}, str(d)) or d, "without ldae metadata"),
    (
        "wrong kind",
        lambda s, d: d.write_bytes((s.parent / "pca.safetensors").read_bytes()) and d,
        "is a 'pca' checkpoint; probe reads a pretrain checkpoint",
    ),
    (
        "missing grid",
        lambda s, d: rewrite_metadata(s, d, lambda m: m["extra"]["model_spec"].pop("grid")),
        "without 'model_spec.grid' in its metadata",
    ),
    (
        "missing tokenizer",
        lambda s, d: rewrite_metadata(s, d, lambda m: m["extra"].pop("tokenizer")),
        "without 'tokenizer.kind' in its metadata",
    ),
    (
        "spec does not fit tensors",
        lambda s, d: rewrite_metadata(s, d, lambda m: m["extra"]["model_spec"].update(width=64)),
        "its tensors do not match the network its metadata describes",
    ),
    (
        "grid does not fit image size",
        lambda s, d: rewrite_metadata(s, d, lambda m: m["extra"].update(image_size=64)),
        "metadata is damaged or was edited",
    ),
    (
        "newer config key",
        lambda s, d: rewrite_metadata(s, d, lambda m: m["config"]["diffusion"].update(sampler="dpm")),
        "unknown config key 'sampler'",
    ),
    ("damaged json", _bad_json, "metadata is damaged (invalid JSON)"),
]


@pytest.mark.parametrize("name,make,fragment", BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_a_bad_checkpoint_is_named_in_one_line(name, make, fragment, world, run_main, tmp_path):
    bad = make(world.ckpt, tmp_path / "bad.safetensors")
    before = snapshot(world.root, tmp_path)
    line = one_line(run_main(*probe_args(world, tmp_path / "probe", ckpt=bad)), 1, fragment)
    assert str(bad) in line
    if name == "newer config key":
        assert "written by ldae" in line and "upgrade ldae" in line
    assert not (tmp_path / "probe").exists()
    unchanged(before)


def test_bad_yaml_and_a_yaml_payload_are_one_line(run_main, world, tmp_path):
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    one_line(run_main("pretrain", "--config", str(tmp_path / "bad.yaml")), 1, "not valid YAML")
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    one_line(run_main("pretrain", "--config", str(tmp_path / "evil.yaml")), 1, "evil.yaml")
    assert not marker.exists()


def test_an_empty_image_folder_is_named(run_main, tmp_path):
    (tmp_path / "empty" / "train" / "x").mkdir(parents=True)
    one_line(
        run_main(
            "fit-pca",
            "--source",
            "imagefolder",
            "--data",
            str(tmp_path / "empty"),
            "--patch",
            "4",
            "--dim",
            "4",
            "--out",
            str(tmp_path / "p.safetensors"),
        ),
        1,
        "no images found",
    )


def _bad_images(root: Path) -> Path:
    """A copy of the pattern tree with one unreadable file in train/a."""
    tree = write_pattern_tree(root)
    (tree / "train" / "a" / "9.png").write_bytes(b"not a png")
    return tree


@pytest.mark.parametrize("cache,batch", [("always", 16), ("never", 17)])  # cached: the bad one is dropped first
def test_unreadable_images_are_named_or_skipped_and_counted(cache, batch, run_main, world, tmp_path):
    tree = _bad_images(tmp_path / "images")
    args = [
        "pretrain",
        "--config",
        "final.yaml",
        *sets(tiny_overrides(tree, tmp_path / "err", **TOKENS, **{"tokenizer.path": world.pca, "data.cache": cache})),
    ]
    one_line(run_main(*args), 1, "9.png: cannot read image", "data.on_bad_image=skip")
    args = [
        "pretrain",
        "--config",
        "final.yaml",
        *sets(
            tiny_overrides(
                tree,
                tmp_path / "skip",
                **TOKENS,
                **{
                    "tokenizer.path": world.pca,
                    "data.cache": cache,
                    "data.on_bad_image": "skip",
                    "optim.batch_size": batch,
                },
            )
        ),
    ]
    assert run_main(*args).returncode == 0
    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records if "loss" in r][
        -1
    ] == 1  # counted whether the dataset was cached or read batch by batch


def _bomb(path: Path) -> Path:
    Image.new("L", (9000, 9000)).save(path)  # 81M pixels, over the limit set below
    return path


def test_a_decompression_bomb_is_an_error_in_denoise_and_skipped_in_a_dataset(world, tmp_path, monkeypatch):
    """Over Pillow's limit an image is refused with its name, never a DecompressionBombError."""
    from PIL import Image as PILImage

    from ldae_cli.config import load_config
    from ldae_cli.data.pipeline import DataConfig, build_dataset
    from ldae_cli.errors import LdaeError
    from ldae_cli.stages import denoise

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20_000_000)  # error above 40M pixels
    bomb = _bomb(tmp_path / "bomb.png")
    with pytest.raises(LdaeError, match=r"bomb\.png: cannot read image \(.*decompression bomb"):
        denoise.main([str(bomb)], ckpt=str(world.ckpt), out=str(tmp_path / "out"))
    tree = write_pattern_tree(tmp_path / "tree")
    _bomb(tree / "train" / "a" / "big.png")
    cfg = load_config(DataConfig, None, ["source=imagefolder", f"path={tree}", "on_bad_image=skip", "num_workers=0"])
    with pytest.warns(UserWarning, match="big.png"):
        ds = build_dataset(cfg, "train")
    assert ds.skipped == 1 and len(ds) == 16


def test_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A 6000x4000 photo for a 32-pixel crop: decoded at 1/8 scale (750x500), megabytes instead of 72 MB."""
    code = f"""
import resource, sys
from PIL import Image
Image.new("RGB", (6000, 4000), (120, 30, 200)).save({str(tmp_path / "big.jpg")!r}, quality=90)
import gc; gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from ldae_cli.data.pipeline import load_image_file
from ldae_cli.data.sources import decode
img = decode({str(tmp_path / "big.jpg")!r}, 32)
x = load_image_file({str(tmp_path / "big.jpg")!r}, 32)
print(img.size, tuple(x.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(750, 500) (3, 32, 32) "), out.stdout
    assert int(out.stdout.split()[-1]) < 40, out.stdout  # MB the process grew by; the full decode alone is 72 MB


# ------------------------------------------------------------------------------------------ ownership


def test_two_runs_at_once_the_second_names_the_first(world, run_main, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / ".ldae.lock").write_text(
            json.dumps(
                {
                    "pid": holder.pid,
                    "host": socket.gethostname(),
                    "command": "ldae pretrain",
                    "since": "2026-12-01T10:00:00",
                }
            )
        )
        before = snapshot(tmp_path, world.root)
        one_line(
            run_main(*pretrain_args(world, run)),
            1,
            f"{run} is in use by `ldae pretrain` (pid {holder.pid} on this host",
        )
        unchanged(before)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_a_remote_one_is_not(world, run_main, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "stale"
    run.mkdir()
    (run / ".ldae.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert run_main(*pretrain_args(world, run, **{"tokenizer.path": world.pca})).returncode == 0
    assert not (run / ".ldae.lock").exists() and (run / "checkpoint.safetensors").exists()
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / ".ldae.lock").write_text(json.dumps({"pid": 1, "host": "gpu-node-7"}))
    one_line(run_main(*pretrain_args(world, remote)), 1, "in use by", "on host gpu-node-7", "delete")


def test_resume_writes_only_into_its_own_directory(world, run_main, tmp_path):
    other = tmp_path / "other"
    assert run_main(*pretrain_args(world, other, **{"tokenizer.path": world.pca})).returncode == 0
    before = snapshot(world.root, tmp_path)
    one_line(
        run_main("pretrain", "--resume", str(world.cut), "--out", str(other)),
        1,
        "a resumed run writes only there",
        "leave out --out",
    )
    unchanged(before)


def test_a_new_run_never_replaces_another_without_force(world, run_main, tmp_path):
    run = tmp_path / "run"
    assert run_main(*pretrain_args(world, run, **{"tokenizer.path": world.pca})).returncode == 0
    before = snapshot(tmp_path, world.root)
    assert "--resume" not in one_line(
        run_main(*pretrain_args(world, run, **{"tokenizer.path": world.pca})),
        1,
        "already holds a pretrain checkpoint of a finished run",
        "--force",
    )
    unchanged(before)
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("not a run")
    assert "--force" not in one_line(run_main(*pretrain_args(world, keep)), 1, "already holds mine.txt")
    one_line(run_main(*pretrain_args(world, keep), "--force"), 1, "ldae did not write")
    assert (keep / "mine.txt").read_text() == "not a run"
    first = (run / "checkpoint.safetensors").read_bytes()
    assert (
        run_main(*pretrain_args(world, run, **{"tokenizer.path": world.pca, "run.seed": 5}), "--force").returncode == 0
    )
    assert (run / "checkpoint.safetensors").read_bytes() != first and load_checkpoint(
        run / "checkpoint.safetensors"
    ).config["run"]["seed"] == 5


def test_single_file_outputs_are_never_replaced_without_force(world, run_main, tmp_path):
    image = next((world.images / "val" / "a").glob("*.png"))
    cases = [
        (
            "fit-pca",
            "--source",
            "imagefolder",
            "--data",
            str(world.images),
            "--patch",
            "4",
            "--dim",
            "4",
            "--patches",
            "500",
            "--out",
            str(tmp_path / "pca.safetensors"),
            "--set",
            "data.num_workers=0",
        ),
        ("export", "--ckpt", str(world.ckpt), "--out", str(tmp_path / "vit.safetensors")),
        ("denoise", str(image), "--ckpt", str(world.ckpt), "--out", str(tmp_path / "panel.png")),
        ("report", str(tmp_path / "pre")),
    ]
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "metrics.jsonl").write_bytes((world.root / "pre" / "metrics.jsonl").read_bytes())
    for args in cases:
        assert run_main(*args).returncode == 0, args
    before = snapshot(tmp_path, world.root)
    for args in cases:
        one_line(run_main(*args), 1, "already exists", "--force")
    unchanged(before)
    assert run_main(*cases[1], "--force").returncode == 0


def test_denoise_never_gives_two_images_one_panel(world, run_main, tmp_path):
    src = next((world.images / "val" / "a").glob("*.png"))
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "img.png").write_bytes(src.read_bytes())
    res = run_main(
        "denoise", str(tmp_path / "x"), str(tmp_path / "y"), "--ckpt", str(world.ckpt), "--out", str(tmp_path / "out")
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "x__img_png-denoised.png",
        "y__img_png-denoised.png",
    ]


# ------------------------------------------------------------------------------------------ faults


def test_nan_before_the_first_save_names_no_checkpoint(world, run_main, tmp_path):
    run = tmp_path / "nan"
    res = run_main(
        *pretrain_args(
            world, run, **{"tokenizer.path": world.pca, "optim.lr": 1e30, "optim.epochs": 20, "optim.warmup_epochs": 0}
        )
    )
    one_line(res, 1, "no checkpoint was written before")
    assert not (run / "checkpoint.safetensors").exists() and (run / "metrics.jsonl").exists()


def test_nan_keeps_only_a_finite_checkpoint(world, run_main, tmp_path):
    run = tmp_path / "nan"
    res = run_main(
        *pretrain_args(
            world,
            run,
            **{
                "tokenizer.path": world.pca,
                "optim.lr": 1e30,
                "optim.epochs": 20,
                "optim.warmup_epochs": 0,
                "run.save_every": 1,
            },
        )
    )
    line = one_line(res, 1)
    assert "non-finite" in line or "loss became" in line
    if (run / "checkpoint.safetensors").exists():
        ck = load_checkpoint(run / "checkpoint.safetensors")
        assert f"the last good checkpoint (step {ck.extra['step']}) is kept" in line
        assert all(torch.isfinite(v).all() for v in ck.tensors.values() if v.is_floating_point())
    else:
        assert "no checkpoint was written before" in line


def _finished_copy(world, tmp_path) -> Path:
    """The unfinished run, copied: resuming it must save again."""
    run = tmp_path / "copy"
    shutil.copytree(world.cut.parent, run)
    return run


def test_a_full_disk_names_the_folder_and_keeps_the_old_checkpoint(world, run_main, tmp_path, monkeypatch):
    run = _finished_copy(world, tmp_path)
    before, metrics = snapshot(run), (run / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=5000))
    one_line(
        run_main("pretrain", "--resume", str(run)),
        1,
        f"not enough space in {run} to write checkpoint.safetensors",
        "MB are free",
        "previous file, if any, is unchanged",
    )
    kept_or_appended(before, metrics)
    assert not list(run.glob(".*.tmp"))


def test_a_disk_filling_up_mid_write_leaves_no_temp_file(world, run_main, tmp_path, monkeypatch):
    import ldae_cli.runs.checkpoint as ckpt_mod

    run = _finished_copy(world, tmp_path)
    before, metrics = snapshot(run), (run / "metrics.jsonl").read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    one_line(run_main("pretrain", "--resume", str(run)), 1, "not enough space in", "checkpoint.safetensors")
    kept_or_appended(before, metrics)
    assert not list(run.glob(".*.tmp"))


def test_a_read_only_folder_is_named(world, run_main, tmp_path, monkeypatch):
    import ldae_cli.runs.checkpoint as ckpt_mod

    run = _finished_copy(world, tmp_path)
    before, metrics = snapshot(run), (run / "metrics.jsonl").read_bytes()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(run))

    monkeypatch.setattr(ckpt_mod.tempfile, "mkstemp", denied)
    one_line(
        run_main("pretrain", "--resume", str(run)),
        1,
        f"cannot write checkpoint.safetensors in {run}",
        "Permission denied",
        "writable --out",
    )
    kept_or_appended(before, metrics)


def test_a_torn_metrics_line_never_blocks_a_resume(world, run_main, tmp_path):
    run = _finished_copy(world, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a kill while writing the line
    assert run_main("pretrain", "--resume", str(run)).returncode == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_temp_files_of_a_killed_save_are_removed_on_the_next_start(world, run_main, tmp_path):
    run = _finished_copy(world, tmp_path)
    (run / ".checkpoint.safetensors.k1ll3d00.tmp").write_bytes(b"\0" * 1000)  # what SIGKILL mid-save leaves
    res = run_main("pretrain", "--resume", str(run))
    assert res.returncode == 0 and "removed 1 temp file(s)" in res.stdout
    assert not list(run.glob(".*.tmp")) and not (run / ".ldae.lock").exists()


def _cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ldae_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        **kw,
    )


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig,code,name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_during_training_saves_and_says_so_in_one_line(sig, code, name, world, tmp_path):
    run = tmp_path / "run"
    proc = _cli(*pretrain_args(world, run, **{"tokenizer.path": world.pca, "optim.epochs": 400, "run.log_every": 1}))
    _wait_for(run / "metrics.jsonl")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    res = SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)
    line = one_line(res, code, f"({name}); the checkpoint of step", "is kept", f"--resume {run}")
    step = load_checkpoint(run / "checkpoint.safetensors").extra["step"]
    assert f"stopped at step {step} " in line and not (run / ".ldae.lock").exists()


def test_sigterm_before_training_says_nothing_was_saved(world, tmp_path):
    run = tmp_path / "run"
    # a PCA fit of D = 3072 takes seconds (more patches than the images hold would not: each is taken once)
    proc = _cli(*pretrain_args(world, run, **{"tokenizer.patch": 32, "data.image_size": 512}))
    _wait_for(run / ".ldae.lock")
    time.sleep(1.0)  # inside the PCA fit
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    one_line(
        SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err),
        143,
        "terminated (SIGTERM) before anything of this run was saved",
    )
    assert not run.exists()  # nothing of value was written, so nothing is left


def test_sigkill_at_random_moments_then_resume_is_bit_exact(world, tmp_path):
    sets_ = {"tokenizer.path": world.pca, "optim.epochs": 8, "run.save_every": 1, "run.log_every": 1, "optim.ema": 0.9}
    assert _cli(*pretrain_args(world, tmp_path / "whole", **sets_)).wait(timeout=300) == 0
    run = tmp_path / "killed"
    proc = _cli(*pretrain_args(world, run, **sets_))
    for delay in (0.2, 0.05):
        _wait_for(run / "checkpoint.safetensors")
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc = _cli("pretrain", "--resume", run)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    a = load_file(tmp_path / "whole" / "checkpoint.safetensors")
    b = load_file(run / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run.glob(".*.tmp")) and not (run / ".ldae.lock").exists()
