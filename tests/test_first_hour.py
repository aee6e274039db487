"""A new user's first hour (issue 23): their own folder just works (a photo folder, a train/test tree, with no
--source and no --set data.*), everything checkable fails before any work, defaults name their inputs, and the
CLI behaves as people expect (--print-config, --dry-run, --init-from, completion, plain flags, whole log lines)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT, one_line, run_cli, sets, snapshot, tiny_overrides, unchanged, write_pattern_tree

from ldae_cli.runs.checkpoint import load_checkpoint, read_metadata

TINY = {
    "model.size": "custom",
    "model.width": 32,
    "model.encoder_depth": 1,
    "model.decoder_depth": 1,
    "model.num_heads": 2,
    "optim.batch_size": 8,
    "optim.epochs": 1,
    "optim.warmup_epochs": 0.1,
    "data.num_workers": 0,
    "run.compile": False,
    "run.progress": False,
    "run.device": "cpu",
    "online_probe.enabled": False,
}


def tiny(**extra) -> list[str]:
    return sets([f"{k}={v}" for k, v in {**TINY, **extra}.items()])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A train/test class tree (no val) and a flat folder of unlabelled photos, as a new user has them."""
    root = tmp_path_factory.mktemp("user")
    tree = write_pattern_tree(root / "tt", splits=("train", "test"), per_class=8)
    photos = root / "photos"
    photos.mkdir()
    for i, image in enumerate(sorted((tree / "train").rglob("*.png"))):
        shutil.copy(image, photos / f"IMG_{i:04d}.png")
    return tree, photos


def test_data_alone_says_what_it_is(folders, run_main, tmp_path):
    tree, photos = folders
    for data, kind in ((tree, "imagefolder"), (photos, "images")):
        out = tmp_path / f"{kind}.safetensors"
        res = run_main(
            "fit-pca",
            "--patch",
            "4",
            "--dim",
            "8",
            "--patches",
            "2000",
            "--data",
            str(data),
            "--out",
            str(out),
            "--set",
            "data.num_workers=0",
        )
        assert res.returncode == 0, res.stderr
        assert read_metadata(out)["config"]["data"]["source"] == kind
    assert (
        "evaluation split 'test'"
        in run_main(
            "fit-pca",
            "--patch",
            "4",
            "--dim",
            "8",
            "--patches",
            "2000",
            "--data",
            str(tree),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--set",
            "data.num_workers=0",
        ).stdout
    )
    one_line(
        run_main("fit-pca", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y.safetensors")),
        1,
        "does not exist",
        "a folder of images, a <split>/<class>/<image> tree",
    )


def test_no_data_names_the_choices():
    from ldae_cli.data import discovery
    from ldae_cli.errors import LdaeError

    with pytest.raises(LdaeError, match="nothing names the data: no --data.*give --data DIR: a folder of images"):
        discovery.detect(None)  # no default dataset, whatever is installed (tests/test_your_data.py)


def test_a_train_test_tree_runs_every_stage_with_no_source_and_no_data_settings(folders, run_main, tmp_path):
    tree, _ = folders
    res = run_main(
        "pretrain",
        "--config",
        "final.yaml",
        "--data",
        str(tree),
        "--out",
        str(tmp_path / "pre"),
        *tiny(**{"tokenizer.patch": 4, "tokenizer.dim": 8, "tokenizer.fit_patches": 2000, "data.image_size": 32}),
    )
    assert res.returncode == 0, res.stderr
    ckpt = tmp_path / "pre" / "checkpoint.safetensors"
    assert load_checkpoint(ckpt).config["data"]["eval_split"] == "test"
    probe = run_main(
        "probe",
        "--ckpt",
        str(ckpt),
        "--config",
        "probe/small-fast.yaml",
        *sets(
            [
                "probe.batch_size=8",
                "probe.epochs=1",
                "probe.warmup_epochs=0.1",
                "data.num_workers=0",
                "run.progress=false",
            ]
        ),
    )
    assert probe.returncode == 0, probe.stderr
    named = tmp_path / "runs" / "probe" / f"pre-{tree.name}-small-fast"  # named after the run and its data
    assert (named / "results.json").is_file() and (named / "results.png").is_file()
    denoise = run_main("denoise", "--samples", "4", "--ckpt", str(ckpt))
    assert denoise.returncode == 0 and "(the 'test' split)" in denoise.stdout
    prepared = run_main(
        "prepare-data",
        "--data",
        str(tree),
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "ready"),
        "--set",
        "data.num_workers=0",
    )
    assert prepared.returncode == 0, prepared.stderr
    assert sorted(p.name for p in (tmp_path / "ready").iterdir() if p.is_dir()) == ["test", "train"]


def test_a_photo_folder_pretrains_and_denoises_on_its_training_images(folders, run_main, tmp_path):
    _, photos = folders
    res = run_main(
        "pretrain",
        "--config",
        "final.yaml",
        "--data",
        str(photos),
        "--out",
        str(tmp_path / "runs" / "pre"),
        *tiny(**{"tokenizer.patch": 4, "tokenizer.dim": 8, "tokenizer.fit_patches": 2000, "data.image_size": 32}),
    )
    assert res.returncode == 0, res.stderr
    assert "training only" in res.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "pre" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["denoising (clean | noisy | denoised), training images: no evaluation split"]
    denoise = run_main("denoise", "--samples", "4")  # the newest pretrain checkpoint anywhere under runs/
    assert denoise.returncode == 0, denoise.stderr
    assert "training images: this unlabelled dataset has no evaluation split" in denoise.stdout


def test_expensive_work_never_fails_late(folders, run_main, tmp_path):
    tree, _ = folders
    before = snapshot(tree)
    out = tmp_path / "big-batch"
    line = one_line(
        run_main(
            "pretrain",
            "--config",
            "final.yaml",
            "--data",
            str(tree),
            "--out",
            str(out),
            *tiny(**{"optim.batch_size": 2048, "tokenizer.patch": 4}),
        ),
        1,
        "fewer than one global batch of 2,048",
        "optim.batch_size",
    )
    assert "tokenizer.path is empty" not in line and not out.exists()  # before the PCA fit, and nothing left
    one_line(
        run_main(
            "pretrain",
            "--config",
            "final.yaml",
            "--data",
            str(tree),
            "--eval-split",
            "val",
            "--out",
            str(out),
            *tiny(**{"tokenizer.patch": 4}),
        ),
        1,
        "no 'val'",
    )
    assert not out.exists()
    one_line(
        run_main(
            "prepare-data",
            "--data",
            str(tree),
            "--eval-split",
            "val",
            "--image-size",
            "32",
            "--out",
            str(tmp_path / "ready"),
        ),
        1,
        "no 'val' split",
    )
    assert not (tmp_path / "ready").exists()  # nothing written, not even the train split
    unchanged(before)


def test_a_pca_file_supplies_its_own_patch_and_dim(world, run_main, tmp_path):
    args = [
        "pretrain",
        "--config",
        "final.yaml",
        *sets(tiny_overrides(world.images, tmp_path / "run", **TINY, **{"tokenizer.path": world.pca})),
    ]
    res = run_main(*args, "--print-config")
    cfg = yaml.safe_load(res.stdout)  # stdout is the YAML alone
    assert (cfg["tokenizer"]["patch"], cfg["tokenizer"]["dim"]) == (4, 8)  # final.yaml says 16 and 32
    one_line(run_main(*args, "--set", "tokenizer.patch=8"), 1, "tokenizer.patch is 8 but", "fitted with patch 4")


def test_print_config_round_trips_and_dry_run_writes_nothing(world, run_main, tmp_path):
    args = [
        "pretrain",
        "--config",
        "final.yaml",
        *sets(tiny_overrides(world.images, tmp_path / "run", **TINY, **{"tokenizer.patch": 4})),
    ]
    printed = run_main(*args, "--print-config").stdout
    (tmp_path / "resolved.yaml").write_text(printed)
    assert run_main("pretrain", "--config", str(tmp_path / "resolved.yaml"), "--print-config").stdout == printed
    plan = run_main(*args, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    for fragment in (
        "nothing was written",
        "2 steps = 1 epoch of 2 steps",
        "8 global = 1 rank(s) x 1 accumulation x 8",
        "img/s per rank",
        "the PCA tokenizer is fitted on",
    ):
        assert fragment in " ".join(plan.stdout.split()), fragment
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolved.yaml"]
    for stage in (
        [
            "finetune",
            "--ckpt",
            str(world.ckpt),
            "--config",
            "finetune/cifar10",
            "--data",
            str(world.images),
            "--set",
            "optim.batch_size=8",
        ],
        ["probe", "--ckpt", str(world.ckpt), "--config", "probe/small-fast.yaml", "--set", "probe.batch_size=8"],
        [
            "train-tokenizer",
            "--config",
            "tokenizer/patch-ae",
            "--data",
            str(world.images),
            "--set",
            "optim.batch_size=8",
        ],
    ):
        res = run_main(*stage, "--dry-run")
        assert res.returncode == 0 and "nothing was written" in res.stdout, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolved.yaml"]


def test_init_from_continues_a_finished_run_with_a_new_schedule(world, run_main, tmp_path):
    res = run_main(
        "pretrain",
        "--init-from",
        str(world.ckpt),
        "--out",
        str(tmp_path / "more"),
        "--set",
        "optim.epochs=3",
        "--set",
        "online_probe.enabled=false",
    )
    assert res.returncode == 0, res.stderr
    child = load_checkpoint(tmp_path / "more" / "checkpoint.safetensors")
    parent = load_checkpoint(world.ckpt)
    assert child.extra["total_steps"] == 6 and child.provenance["parents"][0]["sha256"] == parent.sha256
    assert child.provenance["parents"][0]["role"] == "init"
    one_line(
        run_main(
            "pretrain", "--init-from", str(world.ckpt), "--out", str(tmp_path / "wider"), "--set", "model.width=64"
        ),
        1,
        "keeps its network and tokenizer",
        "model.width: 32 -> 64",
    )


def test_probe_reads_plain_and_timm_exports(world, run_main, tmp_path):
    plain, folder = tmp_path / "vit.safetensors", tmp_path / "vit-timm"
    assert run_main("export", "--ckpt", str(world.ckpt), "--out", str(plain)).returncode == 0
    assert run_main("export", "--ckpt", str(world.ckpt), "--out", str(folder), "--format", "timm").returncode == 0
    results = []
    for encoder, extra in ((world.ckpt, []), (plain, []), (folder, ["--data", str(world.images)])):
        res = run_main(*probe_args_for(encoder, tmp_path / f"p-{Path(encoder).stem}"), *extra)
        assert res.returncode == 0, res.stderr
        results.append(load_checkpoint(tmp_path / f"p-{Path(encoder).stem}" / "checkpoint.safetensors"))
    knn = [r.extra["eval"]["knn_top1"] for r in results]
    assert knn[0] == knn[1] == knn[2]  # the same encoder folded at the same t, read three ways


def probe_args_for(ckpt: Path, out: Path) -> list[str]:
    return [
        "probe",
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--config",
        "probe/small-fast.yaml",
        *sets(
            [
                "probe.batch_size=8",
                "probe.epochs=1",
                "probe.warmup_epochs=0.1",
                "data.num_workers=0",
                "run.progress=false",
            ]
        ),
    ]


def test_the_cli_conventions(tmp_path):
    started = time.perf_counter()
    res = run_cli("--help")
    elapsed = time.perf_counter() - started
    assert res.returncode == 0 and elapsed < 2.0  # the interpreter start included; `ldae --help` itself is < 0.5 s
    assert "<bool>" not in run_cli("pretrain", "--help").stdout
    assert "[default:" not in run_cli("study", "--help").stdout  # one style: "(default: ...)"
    completion = run_cli("--show-completion", "bash")
    assert completion.returncode == 0 and "complete" in completion.stdout


def test_ldae_help_imports_no_torch():
    code = "import sys; from ldae_cli import cli; assert 'torch' not in sys.modules, sorted(sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr


def test_log_lines_in_a_file_are_never_wrapped(world, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "run"
    res = run_cli(
        *[
            "pretrain",
            "--config",
            "final.yaml",
            *sets(tiny_overrides(world.images, deep, **TINY, **{"tokenizer.path": world.pca})),
        ],
        env={"COLUMNS": "80"},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert f"wrote {deep / 'checkpoint.safetensors'}" in res.stdout  # one line, the path whole


def test_the_progress_bar_fits_an_80_column_terminal(monkeypatch):
    import io

    from rich.console import Console

    from ldae_cli.runs import logs

    out = io.StringIO()
    monkeypatch.setattr(logs, "console", Console(file=out, width=80, force_terminal=True, color_system=None))
    with logs.progress_bar("img") as bar:
        task = bar.add_task("train-tokenizer", total=200_000, info="")
        for _ in range(3):
            time.sleep(0.2)
            bar.update(task, advance=2_000, info="loss 0.0168 lr 0.000324 ep 0.51")
    last = out.getvalue().split("\r")[-1].split("\n")[0]
    assert "img/s" in last and "<" in last and "loss 0.0168" in last  # rate, elapsed<ETA and the loss on one line
