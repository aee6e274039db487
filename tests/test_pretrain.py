"""Pretraining: every trajectory row runs, the objective can overfit, resume is exact, DDP matches one
process, a NaN loss stops the run cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_overrides, train_tiny_conv_vae

from ldae_cli.config import BUNDLED_CONFIGS, _read_yaml, find_config, load_config, to_dict
from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint
from ldae_cli.stages import pretrain as stage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def images(pattern_tree) -> Path:
    return pattern_tree


def trajectory_rows() -> list[str]:
    return sorted(p.stem for p in (BUNDLED_CONFIGS / "trajectory").glob("*.yaml"))


def test_final_is_trajectory_row_t35():
    final = to_dict(load_config(stage.PretrainConfig, "final.yaml"))
    row = to_dict(load_config(stage.PretrainConfig, "trajectory/T3.5.yaml"))
    assert final == row


@pytest.mark.parametrize("row", trajectory_rows())
def test_every_trajectory_row_runs_two_steps(row, images, tmp_path):
    sets = {"online_probe.per_class": 1, "online_probe.max_share": 1}  # 8 images per class: on, at every probe
    tokenizer = _read_yaml(find_config(f"trajectory/{row}.yaml"))["tokenizer"]
    if tokenizer["kind"] == "pixel":
        sets["data.image_size"] = 8 * tokenizer["patch"]  # 64 tokens whatever the patch
    elif tokenizer["kind"] == "pca":
        sets.update({"tokenizer.patch": 4, "tokenizer.dim": 8})
    if tokenizer["kind"] == "trained":
        with pytest.raises(LdaeError, match="tokenizer.path"):
            load_config(stage.PretrainConfig, f"trajectory/{row}.yaml", tiny_overrides(images, tmp_path / row))
        sets.update({"tokenizer.path": train_tiny_conv_vae(images, tmp_path / "tok"), "tokenizer.patch": 4})
    overrides = tiny_overrides(images, tmp_path / row, **sets)
    cfg = load_config(stage.PretrainConfig, f"trajectory/{row}.yaml", overrides)
    path = stage.run(cfg, row)
    ck = load_checkpoint(path, "pretrain")
    assert ck.extra["step"] == 2 and ck.extra["finished"]
    records = [json.loads(line) for line in (tmp_path / row / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [r["step"] for r in records if "online_knn_top1" in r] == [1, 2]  # the online probe, a quarter apart
    assert ck.config["diffusion"] == to_dict(cfg)["diffusion"]
    assert (tmp_path / row / "ldae-config.yaml").exists() and (tmp_path / row / "loss.png").exists()


def test_overfits_a_fixed_batch():
    """Same images, timesteps and noise every step: the network must memorise (loss / 10 or better)."""
    from ldae_cli.model.diffusion import Denoiser, DiffusionConfig, NoiseSchedule
    from ldae_cli.model.models import DenoisingViT
    from ldae_cli.model.patches import patchify
    from ldae_cli.model.pca import CovarianceAccumulator, principal_components
    from ldae_cli.model.tokenizers import PCATokenizer

    torch.set_flush_denormal(True)  # as the Trainer does on CPU (adaLN-Zero grads underflow otherwise: slow)
    torch.manual_seed(0)
    imgs = torch.rand(8, 3, 16, 16) * 2 - 1
    acc = CovarianceAccumulator(48)
    acc.update(patchify(imgs, 4).reshape(-1, 48))
    eig, basis = principal_components(acc.covariance())
    tok = PCATokenizer(acc.mean, basis, eig, 4, 8)
    den = Denoiser(DiffusionConfig(), tok, NoiseSchedule(DiffusionConfig()), 16)
    net = DenoisingViT(den.in_dim, den.out_dim, den.grid, 64, 2, 2, 4)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    t = torch.randint(1, 1001, (8,))
    eps = torch.randn(8, 16, 8)
    losses = []
    for _ in range(300):
        loss = den.loss(net, imgs, t, eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def _tensors_equal(a, b, prefix):
    ta, tb = a.section(prefix), b.section(prefix)
    assert ta.keys() == tb.keys() and ta
    return all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_is_bit_exact(images, tmp_path):
    sets = {
        "optim.epochs": 3,
        "optim.ema": 0.9,
        "run.save_every": 2,
        "tokenizer.patch": 4,
        "tokenizer.dim": 8,
        "online_probe.per_class": 1,
        "online_probe.max_share": 1,
    }  # the online probe on, at a fixed cadence
    full = load_config(stage.PretrainConfig, "final.yaml", tiny_overrides(images, tmp_path / "full", **sets))
    stage.run(full, "full")
    first = load_config(
        stage.PretrainConfig,
        "final.yaml",
        tiny_overrides(images, tmp_path / "cut", **sets, **{"run.stop_after_steps": 3}),
    )
    stage.run(first, "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors").extra["step"] == 3
    stage.main(None, [], {}, str(tmp_path / "cut"))
    a = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")
    assert a.extra["step"] == b.extra["step"] == 6
    assert _tensors_equal(a, b, "model") and _tensors_equal(a, b, "ema") and _tensors_equal(a, b, "optim")

    def log(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [r.get("loss") for r in log("full")] == [r.get("loss") for r in log("cut")]
    assert [r.get("online_knn_top1") for r in log("full")] == [r.get("online_knn_top1") for r in log("cut")]


def test_resume_refuses_a_changed_recipe(images, tmp_path):
    cfg = load_config(
        stage.PretrainConfig,
        "final.yaml",
        tiny_overrides(images, tmp_path / "r", **{"tokenizer.patch": 4, "tokenizer.dim": 8, "run.stop_after_steps": 1}),
    )
    stage.run(cfg, "r")
    with pytest.raises(LdaeError, match="optim.blr"):
        stage.main(None, ["optim.blr=0.5"], {}, str(tmp_path / "r"))
    with pytest.raises(LdaeError, match="already holds a pretrain checkpoint"):
        stage.run(cfg, "r")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(images, tmp_path):
    out = tmp_path / "nan"
    cfg = load_config(
        stage.PretrainConfig,
        "final.yaml",
        tiny_overrides(
            images,
            out,
            **{
                "tokenizer.patch": 4,
                "tokenizer.dim": 8,
                "optim.epochs": 40,
                "optim.warmup_epochs": 0,
                "optim.lr": 1e30,
                "run.save_every": 1,
            },
        ),
    )
    with pytest.raises(LdaeError, match=r"loss became (nan|inf).*last good checkpoint \(step \d+\)"):
        stage.run(cfg, "nan")
    ck = load_checkpoint(out / "checkpoint.safetensors", "pretrain")
    assert all(torch.isfinite(v).all() for v in ck.section("model").values())


def _cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "ldae_cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        timeout=600,
        **kw,
    )


def test_ddp_two_ranks_match_one_process(images, tmp_path):
    """2 gloo ranks x 4 images == 1 process x 8 images: same batches, same noise, same loss curve."""
    sets = {"tokenizer.patch": 4, "tokenizer.dim": 8, "optim.epochs": 3}
    # fit the PCA once (the run's pca.safetensors) so both runs share it
    stage.run(
        load_config(
            stage.PretrainConfig,
            "final.yaml",
            tiny_overrides(images, tmp_path / "pca-run", **sets, **{"run.stop_after_steps": 1}),
        ),
        "pca-run",
    )
    sets["tokenizer.path"] = str(tmp_path / "pca-run" / "pca.safetensors")
    one = tiny_overrides(images, tmp_path / "one", **sets)
    two = tiny_overrides(images, tmp_path / "two", **sets)
    args = ["pretrain", "--config", "final.yaml"]
    r1 = _cli(*args, *sum((["--set", s] for s in one), []))
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            "-m",
            "ldae_cli",
            *args,
            *sum((["--set", s] for s in two), []),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    l1 = [
        r["loss"] for r in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    l2 = [
        r["loss"] for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(l1) == len(l2) == 6
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    assert load_checkpoint(tmp_path / "two" / "checkpoint.safetensors").extra["world_size"] == 2
