"""`ldae pretrain --budget`: a run sized to the data and the time (issue 32 item 4), and its refusals as one line
with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from helpers import REPO_ROOT, one_line, snapshot, unchanged, write_pattern_tree
from PIL import Image

from ldae_cli.config import load_config
from ldae_cli.errors import LdaeError
from ldae_cli.train.budget import MAX_EPOCHS, Budget, DataFacts, measured_speed, parse_budget, size_run
from ldae_cli.train.engine_pretrain import PretrainConfig
from ldae_cli.train.online_probe import OnlineProbeConfig

CIFAR = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@pytest.mark.parametrize(
    "text, seconds, gpus, gpu",
    [
        ("30m", 1800, 0, None),
        ("2h", 7200, 0, None),
        ("1d", 86400, 0, None),
        ("1.5h", 5400, 0, None),
        ("8xH100:12h", 43200, 8, "H100"),
        ("2xh200:90m", 5400, 2, "H200"),
    ],
)
def test_parse_budget_reads_a_time_or_gpus_and_a_time(text, seconds, gpus, gpu):
    assert parse_budget(text) == Budget(seconds, gpus, gpu, text)


@pytest.mark.parametrize(
    "text, said",
    [
        ("30", "expected a time"),
        ("", "expected a time"),
        ("0m", "expected a time"),
        ("2 hours", "expected a time"),
        ("0xH100:1h", "expected a time"),
        ("8xH100", "expected a time"),
        ("8xA100:1h", "known: H100, H200"),
    ],
)
def test_a_bad_budget_is_one_line_naming_it_and_the_valid_forms(text, said):
    with pytest.raises(LdaeError) as err:
        parse_budget(text)
    message = str(err.value)
    assert "\n" not in message and f"--budget {text!r}" in message and said in message
    assert "30m" in message or "H100" in message


def flops_speed(rate: float = 1e11):
    """A machine that trains at `rate` FLOP/s whatever the network: images per second = rate / FLOPs per image."""
    return lambda c: rate / c.flops


def facts(images=10_000, classes=10, eval_images=1_000, side=64, name="tree"):
    return DataFacts(name, images, classes, eval_images, side)


def sized(f: DataFacts, text: str = "30m", rate: float = 1e11) -> dict:
    return size_run(f, parse_budget(text), flops_speed(rate), OnlineProbeConfig()).overrides


def test_tiny_data_gets_the_smallest_model_and_no_online_probe():
    out = sized(facts(images=8, classes=2, eval_images=8, side=32))
    assert (out["model.size"], out["model.width"], out["model.encoder_depth"]) == ("custom", 128, 4)
    assert out["online_probe.enabled"] is False
    assert out["optim.batch_size"] <= 8 and out["optim.epochs"] <= MAX_EPOCHS


def test_a_64_px_tree_gets_its_native_size_a_patch_of_16_to_64_tokens_and_d_16():
    out = sized(facts(side=64))
    assert out["data.image_size"] == 64 and out["tokenizer.patch"] in (8, 16) and out["tokenizer.dim"] == 16
    assert 16 <= (64 // out["tokenizer.patch"]) ** 2 <= 64


@pytest.mark.parametrize(
    "side, size, patch, dim",
    [
        (32, 32, 4, 16),
        (28, 28, 4, 16),
        (100, 96, 16, 16),
        (224, 224, 32, 16),
        (3000, 256, 32, 16),
        (8, 8, 2, 4),
    ],
)
def test_image_size_patch_and_d_follow_the_rules(side, size, patch, dim):
    """Never above native (capped at 256), 16-64 tokens, d = min(16, D // 3)."""
    out = sized(facts(side=side), "1d", 1e13)
    assert (out["data.image_size"], out["tokenizer.patch"], out["tokenizer.dim"]) == (size, patch, dim)


def test_more_time_buys_proportionally_more_epochs_then_tokens_then_a_larger_model():
    short, long = (sized(facts(images=20_000, side=32), t, 5e10) for t in ("30m", "2h"))  # only the smallest fits
    assert short["model.size"] == long["model.size"] == "custom"
    assert 4 <= short["optim.epochs"] < MAX_EPOCHS and long["optim.epochs"] / short["optim.epochs"] == pytest.approx(
        4, rel=0.05
    )
    short, long = (sized(facts(images=50_000, side=32), t, 5e10) for t in ("30m", "2h"))
    assert (short["tokenizer.patch"], long["tokenizer.patch"]) == (8, 4)  # more time buys more tokens first
    short, long = (sized(facts(images=50_000, side=32), t, 5e11) for t in ("30m", "2h"))
    assert (short["model.size"], long["model.size"]) == ("custom", "T")  # then a larger model


def test_a_short_budget_on_much_data_takes_the_fewest_tokens_and_the_smallest_model():
    out = sized(facts(images=1_000_000, side=64), "10m", 5e10)
    assert out["tokenizer.patch"] == 16 and out["model.size"] == "custom" and out["optim.epochs"] < 4


def test_a_gpu_budget_uses_the_documented_throughput_and_the_paper_scale_model():
    budget = parse_budget("8xH100:12h")
    speed, assumed = measured_speed(None, budget)  # no timing: the figure of docs/bench-pretrain-step-h200.json
    run = size_run(
        facts(images=1_281_167, classes=1000, eval_images=50_000, side=375), budget, speed, OnlineProbeConfig()
    )
    out = run.overrides
    assert "445.5 TFLOP/s per H100" in assumed()
    assert out["model.size"] == "half-L" and out["model.width"] is None  # the preset, not a custom width
    assert (out["data.image_size"], out["tokenizer.patch"]) == (256, 32)
    assert out["optim.batch_size"] == 8 * 256 and out["run.compile"] is True
    assert out["run.time_limit_minutes"] == 720 and out["online_probe.enabled"] is True


def test_images_too_small_to_cut_are_one_line():
    with pytest.raises(LdaeError, match="at least 4 px"):
        sized(facts(side=3))


# --------------------------------------------------------------------------------------------- the command


def write_photos(root, sizes=((160, 120), (200, 150), (120, 90), (90, 120), (400, 300))):
    """A folder of unlabelled photos of several sizes and orientations (median short side 120)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"IMG_{i:04d}.jpg")
    return root


@pytest.mark.parametrize("kind, size, patch", [("tree", 64, 8), ("photos", 112, 16)])
def test_budget_print_config_is_a_sized_config_that_loads_back(run_main, tmp_path, kind, size, patch):
    data = write_pattern_tree(tmp_path / "tree64", size=64) if kind == "tree" else write_photos(tmp_path / "holiday")
    res = run_main("pretrain", "--data", data, "--budget", "30m", "--print-config")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"# --budget 30m sized this run for {data.name}")
    saved = tmp_path / "sized.yaml"
    saved.write_text(res.stdout)
    cfg = load_config(PretrainConfig, saved)
    assert (cfg.data.image_size, cfg.tokenizer.patch, cfg.tokenizer.dim) == (size, patch, 16)
    assert cfg.run.out_dir == f"runs/pretrain/{data.name}" and cfg.run.time_limit_minutes == 30
    assert cfg.online_probe.enabled is False  # 8 images per class, or no labels: below the probe's floor
    assert "online probe: off" in res.stdout
    assert not (tmp_path / "runs").exists()


def test_budget_sizes_the_config_given_and_set_still_wins(run_main, tmp_path):
    """--config with --budget: that config, sized (its objective kept); --set applies after the sizing."""
    data = write_pattern_tree(tmp_path / "tree64", size=64)
    res = run_main(
        "pretrain",
        "--config",
        "trajectory/T2",
        "--data",
        data,
        "--budget",
        "30m",
        "--set",
        "optim.batch_size=4",
        "--print-config",
    )
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["diffusion"]["target"] == "eps" and cfg["diffusion"]["input_space"] == "latent"  # T2's
    assert (cfg["tokenizer"]["patch"], cfg["tokenizer"]["dim"], cfg["optim"]["batch_size"]) == (8, 16, 4)


def test_budget_dry_run_plans_the_sized_run_in_a_folder_named_after_the_data(run_main, tmp_path):
    data = write_pattern_tree(tmp_path / "tree64", size=64)
    res = run_main("pretrain", "--data", data, "--budget", "30m", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "--budget 30m sized this run for tree64" in res.stdout and "runs/pretrain/tree64" in res.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--resume", "runs/pretrain/x"], "cannot go with --resume"),
        (["--init-from", "x.safetensors"], "cannot go with --init-from"),
        (["--continue", "--out", "runs/x"], "cannot go with --continue"),
        (["--budget", "45"], "--budget '45': expected a time on this machine (30m, 2h, 1d)"),
        (["--budget", "8xH100:12h"], "sizes a run for 8 GPUs, and this launch has 1 process(es)"),
        (
            ["--config", "final.yaml", "--set", "data.path=null", "--set", "data.source=fashion-mnist"],
            "give --data DIR",
        ),
    ],
)
def test_budget_refusals_are_one_line_and_write_nothing(run_main, tmp_path, extra, said):
    data = write_pattern_tree(tmp_path / "tree64", size=64, per_class=2)
    budget = [] if "--budget" in extra else ["--budget", "30m"]
    with_data = [] if "data.path=null" in extra else ["--data", data]
    before = snapshot(tmp_path)
    res = run_main("pretrain", *with_data, *budget, *extra)
    one_line(res, 1, said)
    unchanged(before)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not CIFAR.exists(), reason="CIFAR-10 JPEG archive not found (../shared/data/cifar10-jpg.tar.gz)")
def test_budget_on_cifar10_trains_at_32_px_with_d_16_and_the_online_probe(run_main, tmp_path):
    res = run_main("pretrain", "--data", CIFAR, "--budget", "2h", "--print-config")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    # 64 tokens where this machine is fast enough for 4 epochs of them (about 35 img/s), else 16
    assert (cfg["data"]["image_size"], cfg["tokenizer"]["dim"]) == (32, 16) and cfg["tokenizer"]["patch"] in (4, 8)
    assert cfg["run"]["out_dir"] == "runs/pretrain/cifar10-jpg" and cfg["online_probe"]["enabled"] is True
    assert "50,000 training images, 10 classes" in res.stdout


def test_budget_runs_the_sized_config_in_a_folder_named_after_the_data(run_main, tmp_path):
    data = write_pattern_tree(tmp_path / "stripes", size=32)
    res = run_main(
        "pretrain",
        "--data",
        data,
        "--budget",
        "1m",
        "--set",
        "run.stop_after_steps=1",
        "--set",
        "data.num_workers=0",
        "--set",
        "run.progress=false",
        "--set",
        "run.device=cpu",
    )
    assert res.returncode == 0, res.stderr
    assert "--budget 1m sized this run for stripes" in res.stdout
    run = tmp_path / "runs" / "pretrain" / "stripes"
    stored = yaml.safe_load((run / "ldae-config.yaml").read_text())
    assert (stored["data"]["image_size"], stored["tokenizer"]["patch"], stored["tokenizer"]["dim"]) == (32, 4, 16)
    assert stored["run"]["time_limit_minutes"] == 1 and (run / "checkpoint.safetensors").is_file()
